//! The organisation's IT policies on this handset: which key is trusted, which policy is in
//! force for each profile, and the decisions the daemon takes from them.
//!
//! A handset trusts one organisation key (`<state-dir>/org.pub`, set by `pocketvisor policy
//! trust` or `handset --org-key`). A policy signed by it for profile P is applied with
//! [`apply`] into `profiles/P/policy.pvpol` (all or nothing; see [`policy::store`]) and is
//! re-verified at every read, so a file changed on disk refuses the profile's start rather
//! than loosening anything. What the daemon enforces from it:
//! - **boot**: at every start the kernel's and initrd's SHA-256 must be allowed, this build
//!   new enough, and the policy unexpired ([`check_start`]); a resume checks the last two;
//! - **channels**: the policy's lists replace the spec's `channels` for its profile
//!   ([`effective_channels`]);
//! - **screen**: [`screen`] tells the display whether capture and remote viewing are allowed.
//!
//! Policies change through the daemon (`POST /v1/policies`, [`apply_audited`]); with no
//! daemon running, [`apply_offline`] takes the daemon's lock and records the same audit entry
//! in its database, so no change bypasses the audit log.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use policy::{OrgPublicKey, Verified};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm_api::config::VmConfig;

use crate::error::{Error, Result};
use crate::spec::{ChannelPolicy, ProfileSpec};
use crate::state_dir::{self, StateDir};

fn policy_err(e: policy::PolicyError) -> Error {
    Error::Denied(e.to_string())
}

/// The trusted organisation key, if one was set.
pub fn trusted_key(dir: &StateDir) -> Result<Option<OrgPublicKey>> {
    let path = dir.org_key();
    match std::fs::read_to_string(&path) {
        Ok(text) => OrgPublicKey::decode(&text)
            .map(Some)
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()))(e)),
    }
}

/// Makes `key` the trusted organisation key. Replacing a different key needs `replace`
/// (a handset is enrolled with one organisation). Returns false if it was already trusted.
pub fn trust(dir: &StateDir, key: &OrgPublicKey, replace: bool) -> Result<bool> {
    if let Some(current) = trusted_key(dir)? {
        if current == *key {
            return Ok(false);
        }
        if !replace {
            return Err(Error::Conflict(format!(
                "this handset already trusts organisation key {}; replacing it with {} needs \
                 --replace (policies in force that the new key did not sign will then refuse \
                 their profiles' starts)",
                current.fingerprint(),
                key.fingerprint()
            )));
        }
    }
    state_dir::create_private_dir(dir.root())?;
    state_dir::write_atomic(&dir.org_key(), format!("{}\n", key.encode()).as_bytes())?;
    Ok(true)
}

/// The verified policy in force for profile `name`, if any. A policy file without a trusted
/// key, or one that fails verification, is an error: the profile is governed but its policy
/// cannot be read.
pub fn in_force(dir: &StateDir, name: &str) -> Result<Option<Verified>> {
    let file = dir.policy(name);
    let Some(key) = trusted_key(dir)? else {
        if file.exists() {
            return Err(Error::Denied(format!(
                "profile {name:?} has a policy ({}) but the handset trusts no organisation \
                 key (`pocketvisor policy trust`)",
                file.display()
            )));
        }
        return Ok(None);
    };
    policy::read_in_force(&file, name, &key).map_err(policy_err)
}

/// Verifies `envelope` under the trusted key and makes it the policy in force for the
/// profile it names (which must exist), if it is newer and unexpired at `now`.
pub fn apply(dir: &StateDir, envelope: &[u8], now: u64) -> Result<policy::Applied> {
    let key = trusted_key(dir)?.ok_or_else(|| {
        Error::Denied(
            "the handset trusts no organisation key: `pocketvisor policy trust KEY` first".into(),
        )
    })?;
    // Verified before anything in it is used, including the profile name.
    let offered = policy::verify(envelope, &key).map_err(policy_err)?;
    let name = offered.policy.profile.clone();
    if !dir.spec(&name).is_file() {
        return Err(Error::NotFound(name));
    }
    let applied =
        policy::apply(&dir.policy(&name), &name, &key, envelope, now).map_err(policy_err)?;
    // A later import of an older export of this profile is then a rollback.
    crate::policy_travel::record_accepted(dir, &name, &key, applied.policy.policy.version)?;
    Ok(applied)
}

/// `POST /v1/policies`: a signed policy to apply to the profile it names.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyPolicy {
    /// The signed policy file's text, byte for byte (`pocketvisor-policy-v1 ed25519 ...`).
    pub envelope: String,
}

/// What applying a policy did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyApplied {
    /// The profile it governs.
    pub profile: String,
    /// Its version, now in force.
    pub version: u64,
    /// False when this exact policy was already in force (nothing changed).
    pub changed: bool,
    /// The version it replaced, if one was in force.
    pub replaced: Option<u64>,
}

/// The policy in force for one profile (`GET /v1/profiles/{name}/policy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// The profile.
    pub profile: String,
    /// The verified policy in force; none: the profile is not governed.
    pub policy: Option<policy::Policy>,
    /// Whether the policy in force has expired (the profile does not start or resume).
    pub expired: bool,
    /// The screen rules in force (everything allowed without a policy): what the display
    /// asks before capturing or showing the profile's screen remotely.
    pub screen: policy::ScreenPolicy,
    /// The fingerprint of the organisation key the handset trusts, if any.
    pub org_key: Option<String>,
    /// When the MDM last reached this device, by its signed word (unix seconds), if ever.
    pub last_contact: Option<u64>,
    /// When the policy's offline limit locks the profile unless the MDM reaches the device
    /// first (unix seconds); none without a limit.
    pub offline_until: Option<u64>,
}

/// The policy in force for profile `name` (which must exist) and what follows from it.
pub fn status(dir: &StateDir, name: &str, now: u64) -> Result<PolicyStatus> {
    crate::spec::check_name("profile name", name)?;
    if !dir.spec(name).is_file() {
        return Err(Error::NotFound(name.to_string()));
    }
    let org_key = trusted_key(dir)?.map(|k| k.fingerprint());
    let policy = in_force(dir, name)?.map(|v| v.policy);
    let last_contact = crate::mdm_link::lease::last_contact(dir);
    Ok(PolicyStatus {
        offline_until: policy
            .as_ref()
            .and_then(|p| p.offline_deadline(last_contact)),
        last_contact,
        profile: name.to_string(),
        expired: policy.as_ref().is_some_and(|p| p.is_expired(now)),
        screen: policy
            .as_ref()
            .map(|p| p.screen.clone())
            .unwrap_or_default(),
        policy,
        org_key,
    })
}

/// [`apply`], with the audit record every attempt leaves: `record(profile, action, detail)`
/// is called once, with the profile the policy names (`-` when it did not verify),
/// `policy-apply`, and `applied version V (replaces W)`, `version V already in force` or
/// `refused: <why>` after `who`.
pub fn apply_audited(
    dir: &StateDir,
    envelope: &[u8],
    now: u64,
    who: &str,
    record: impl FnOnce(&str, &str, &str),
) -> Result<PolicyApplied> {
    let result = apply(dir, envelope, now).map(|a| PolicyApplied {
        profile: a.policy.policy.profile.clone(),
        version: a.policy.policy.version,
        changed: a.changed,
        replaced: a.replaced,
    });
    // The name is only trusted (and recorded as the profile) once the signature verified.
    let verified_name = trusted_key(dir)
        .ok()
        .flatten()
        .and_then(|k| policy::verify(envelope, &k).ok())
        .map(|v| v.policy.profile)
        .filter(|n| crate::spec::check_name("", n).is_ok());
    let profile = verified_name.as_deref().unwrap_or("-");
    let detail = match &result {
        Ok(a) if !a.changed => format!("{who}: version {} already in force", a.version),
        Ok(a) => match a.replaced {
            Some(old) => format!("{who}: applied version {} (replaces {old})", a.version),
            None => format!("{who}: applied version {}", a.version),
        },
        Err(e) => format!("{who}: refused: {e}"),
    };
    record(profile, "policy-apply", &detail);
    result
}

/// Applies a policy with no daemon running: holds the daemon's lock (so none starts
/// meanwhile; refused if one runs) and records the attempt in the daemon's audit log, as
/// the daemon would.
pub fn apply_offline(dir: &StateDir, envelope: &[u8], now: u64) -> Result<PolicyApplied> {
    let lock_path = dir.lock_file();
    let lock = std::fs::File::options()
        .mode(0o600)
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(Error::io(format!("cannot open {}", lock_path.display())))?;
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(Error::Conflict(format!(
            "a handset daemon holds {} but does not answer on its socket; retry when it does",
            dir.root().display()
        )));
    }
    let db = crate::db::Db::open(&dir.db())?;
    // SAFETY: getuid(2) has no arguments and cannot fail.
    let uid = unsafe { libc::getuid() };
    let who = format!("offline (no daemon) uid {uid} pid {}", std::process::id());
    let mut recorded = Ok(());
    let result = apply_audited(dir, envelope, now, &who, |profile, action, detail| {
        recorded = db.record(crate::db::Log::Audit, profile, action, detail);
    });
    drop(lock);
    match (recorded, result) {
        (Ok(()), result) => result,
        (Err(e), Ok(a)) => Err(Error::Internal(format!(
            "policy version {} for {:?} is in force, but its audit record failed: {e}",
            a.version, a.profile
        ))),
        (Err(e), Err(refused)) => Err(Error::Internal(format!(
            "{refused}; and its audit record failed: {e}"
        ))),
    }
}

/// What a disk made from an image whose hash was never recorded counts as: no listed hash.
const UNRECORDED_IMAGE: &str = "(not recorded)";

/// Refuses to boot `cfg` (made from `spec`) for profile `name` unless its policy (if any) is
/// unexpired, allows this build, the SHA-256 of the kernel and initrd or of the firmware, and
/// the images the spec's disks were made from (as recorded when they were copied).
pub fn check_start(
    dir: &StateDir,
    name: &str,
    spec: &ProfileSpec,
    cfg: &VmConfig,
    now: u64,
) -> Result<()> {
    let Some(v) = in_force(dir, name)? else {
        return Ok(());
    };
    check_expiry(&v, name, now, crate::mdm_link::lease::last_contact(dir))?;
    check_storage(&v, name, spec, "start")?;
    let firmware = cfg.firmware.as_deref().map(sha256_file).transpose()?;
    let kernel = match firmware {
        Some(_) => None,
        None => Some(sha256_file(&cfg.kernel)?),
    };
    let initrd = cfg.initrd.as_deref().map(sha256_file).transpose()?;
    let disk_images: Vec<&str> = spec
        .disks
        .iter()
        .filter(|d| d.image.is_some())
        .map(|d| d.image_sha256.as_deref().unwrap_or(UNRECORDED_IMAGE))
        .collect();
    let images = policy::BootImages {
        kernel: kernel.as_deref(),
        initrd: initrd.as_deref(),
        firmware: firmware.as_deref(),
        disk_images: &disk_images,
    };
    v.policy
        .check_boot(&images, policy::version::this_build())
        .map_err(|why| Error::Denied(format!("profile {name:?} may not start: {why}")))
}

/// Refuses a profile whose policy asks for encryption at rest (`storage.encrypt_at_rest`) but
/// whose disks are not encrypted: it was created without `encrypt_at_rest`, and a profile is
/// encrypted at create only.
fn check_storage(v: &Verified, name: &str, spec: &ProfileSpec, what: &str) -> Result<()> {
    if v.policy.storage.encrypt_at_rest && !spec.encrypt_at_rest {
        return Err(Error::Denied(format!(
            "profile {name:?} may not {what}: its policy version {} asks for encryption at \
             rest and its disks are not encrypted (a profile is encrypted when it is created: \
             `profile create --encrypt`)",
            v.policy.version
        )));
    }
    Ok(())
}

/// Refuses to resume profile `name` (of spec `spec`) if its policy asks for encryption at
/// rest and the profile is not encrypted, besides [`check_resume`]'s reasons.
pub fn check_resume_spec(dir: &StateDir, name: &str, spec: &ProfileSpec, now: u64) -> Result<()> {
    check_resume(dir, name, now)?;
    match in_force(dir, name)? {
        Some(v) => check_storage(&v, name, spec, "resume"),
        None => Ok(()),
    }
}

/// Refuses to resume profile `name` if its policy has expired, its key lease ran out
/// ([`crate::mdm_link::lease`]) or it needs a newer build (the
/// kernel was checked when the guest booted).
pub fn check_resume(dir: &StateDir, name: &str, now: u64) -> Result<()> {
    let Some(v) = in_force(dir, name)? else {
        return Ok(());
    };
    check_expiry(&v, name, now, crate::mdm_link::lease::last_contact(dir))?;
    crate::mdm_link::lease::check(dir, name, now)?;
    v.policy
        .check_boot(
            &policy::BootImages::default(),
            policy::version::this_build(),
        )
        .map_err(|why| Error::Denied(format!("profile {name:?} may not resume: {why}")))
}

/// Refuses a profile whose policy expired or whose device was out of touch longer than its
/// offline limit (`offline.max_offline_secs` from the later of its signed `issued_at` and
/// `last_contact`, the MDM's signed time of its last contact).
fn check_expiry(v: &Verified, name: &str, now: u64, last_contact: Option<u64>) -> Result<()> {
    let p = &v.policy;
    match (p.expires_at, p.offline_deadline(last_contact)) {
        (Some(exp), _) if p.is_expired(now) => Err(Error::Denied(format!(
            "profile {name:?} may not run: its policy version {} expired at {exp} (unix time); \
             apply a newer one",
            p.version
        ))),
        (_, Some(deadline)) if p.is_offline_too_long(now, last_contact) => {
            let since = match last_contact {
                Some(t) if t > p.issued_at => format!("the MDM last reached this device at {t}"),
                _ => format!(
                    "its policy version {} was issued at {} and the MDM has not reached this \
                     device since",
                    p.version, p.issued_at
                ),
            };
            Err(Error::Denied(format!(
                "profile {name:?} may not run: offline limit: {since} (unix time), and the \
                 limit is {} s (until {deadline}); it runs again once the handset reaches its \
                 MDM or a newer policy is applied",
                p.offline.max_offline_secs.unwrap_or_default()
            )))
        }
        _ => Ok(()),
    }
}

/// Why profile `name` may not run now under its policy (expired, offline too long), if so:
/// a running one is locked (suspended) by the daemon.
pub fn lock_reason(dir: &StateDir, name: &str, now: u64) -> Option<String> {
    match check_resume(dir, name, now) {
        Err(Error::Denied(why)) => Some(why),
        _ => None,
    }
}

/// The channel lists that govern `spec`'s profile: its policy's, if one is in force, else
/// the spec's own.
pub fn effective_channels(dir: &StateDir, spec: &ProfileSpec) -> Result<ChannelPolicy> {
    Ok(match in_force(dir, &spec.name)? {
        Some(v) => {
            let c = v.policy.channels;
            ChannelPolicy {
                clipboard_to: c.clipboard_to,
                files_to: c.files_to,
                clipboard_from: c.clipboard_from,
                files_from: c.files_from,
            }
        }
        None => spec.channels.clone(),
    })
}

/// The network policy the VMM enforces on profile `name`'s network devices: none without a
/// policy or with one that lets everything through (`default = "allow"`, no rules).
pub fn net_filter(dir: &StateDir, name: &str) -> Result<Option<vmm_api::config::NetFilterConfig>> {
    use vmm_api::config::{FilterAction, FilterProtocol, NetFilterConfig, NetFilterRule};
    let Some(v) = in_force(dir, name)? else {
        return Ok(None);
    };
    let net = v.policy.network;
    let action = |a: policy::Action| match a {
        policy::Action::Allow => FilterAction::Allow,
        policy::Action::Deny => FilterAction::Deny,
    };
    if net.default == policy::Action::Allow && net.rules.is_empty() {
        return Ok(None);
    }
    Ok(Some(NetFilterConfig {
        default: action(net.default),
        rules: net
            .rules
            .iter()
            .map(|r| NetFilterRule {
                action: action(r.action),
                cidr: r.cidr.map(|c| c.to_string()),
                name: r.name.clone(),
                protocol: match r.protocol {
                    policy::Protocol::Any => FilterProtocol::Any,
                    policy::Protocol::Tcp => FilterProtocol::Tcp,
                    policy::Protocol::Udp => FilterProtocol::Udp,
                    policy::Protocol::Icmp => FilterProtocol::Icmp,
                },
                ports: r.ports.map(|p| [p.first, p.last]),
            })
            .collect(),
        dns_servers: net.dns_servers.iter().map(|a| a.to_string()).collect(),
    }))
}

/// The screen rules for profile `name` (everything allowed without a policy).
pub fn screen(dir: &StateDir, name: &str) -> Result<policy::ScreenPolicy> {
    Ok(in_force(dir, name)?
        .map(|v| v.policy.screen)
        .unwrap_or_default())
}

/// Lower-case hex SHA-256 of a file's contents.
pub fn sha256_file(path: &Path) -> Result<String> {
    let what = || format!("cannot read {}", path.display());
    let mut f = std::fs::File::open(path).map_err(Error::io(what()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(Error::io(what()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use policy::OrgSecretKey;

    const NOW: u64 = 1_764_850_000;

    fn work_spec() -> ProfileSpec {
        ProfileSpec::from_template("work", "work", crate::spec::TemplateBoot::Probe).unwrap()
    }

    fn setup() -> (tempfile::TempDir, StateDir, OrgSecretKey) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = StateDir::new(tmp.path()).unwrap();
        let spec = work_spec();
        std::fs::create_dir_all(dir.profile("work")).unwrap();
        std::fs::write(dir.spec("work"), toml::to_string(&spec).unwrap()).unwrap();
        let key = OrgSecretKey::generate();
        assert!(trust(&dir, &key.public(), false).unwrap());
        (tmp, dir, key)
    }

    fn signed(key: &OrgSecretKey, version: u64, extra: &str) -> Vec<u8> {
        let doc = format!("version = {version}\nissued_at = {NOW}\nprofile = \"work\"\n{extra}");
        policy::sign(doc.as_bytes(), key).unwrap()
    }

    #[test]
    fn only_the_trusted_key_is_replaced_and_only_with_replace() {
        let (_t, dir, key) = setup();
        assert!(!trust(&dir, &key.public(), false).unwrap());
        let other = OrgSecretKey::generate().public();
        let err = trust(&dir, &other, false).unwrap_err();
        assert!(err.to_string().contains("--replace"), "{err}");
        assert_eq!(trusted_key(&dir).unwrap(), Some(key.public()));
        assert!(trust(&dir, &other, true).unwrap());
        assert_eq!(trusted_key(&dir).unwrap(), Some(other));
    }

    #[test]
    fn boot_is_refused_for_a_kernel_the_policy_does_not_allow() {
        let (t, dir, key) = setup();
        let kernel = t.path().join("vmlinux");
        std::fs::write(&kernel, b"kernel one").unwrap();
        let good = sha256_file(&kernel).unwrap();
        let spec = work_spec();
        let mut cfg = VmConfig::new(kernel.clone());
        // No policy: anything boots.
        check_start(&dir, "work", &spec, &cfg, NOW).unwrap();
        let env = signed(&key, 1, &format!("[boot]\nkernels = [\"{good}\"]\n"));
        apply(&dir, &env, NOW).unwrap();
        check_start(&dir, "work", &spec, &cfg, NOW).unwrap();
        std::fs::write(&kernel, b"kernel two").unwrap();
        let err = check_start(&dir, "work", &spec, &cfg, NOW).unwrap_err();
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains("boot.kernels"), "{err}");
        cfg.kernel = t.path().join("missing");
        assert!(check_start(&dir, "work", &spec, &cfg, NOW).is_err());
    }

    #[test]
    fn a_firmware_boot_is_checked_by_its_rom_and_the_images_its_disks_came_from() {
        let (t, dir, key) = setup();
        let rom = t.path().join("bios.bin");
        std::fs::write(&rom, b"rom one").unwrap();
        let rom_hash = sha256_file(&rom).unwrap();
        let image_hash = "c".repeat(64);
        let boot = crate::spec::TemplateBoot::Firmware {
            firmware: "bios.bin",
            image: "debian.raw",
        };
        let mut spec = ProfileSpec::from_template("work", "work", boot).unwrap();
        spec.disks[0].image_sha256 = Some(image_hash.clone());
        let mut cfg = VmConfig::new(std::path::PathBuf::new());
        cfg.firmware = Some(rom.clone());
        check_start(&dir, "work", &spec, &cfg, NOW).unwrap();
        // Kernels pinned: firmware must be listed too, or it would boot any kernel.
        let kernels = format!("kernels = [\"{}\"]\n", "a".repeat(64));
        apply(&dir, &signed(&key, 1, &format!("[boot]\n{kernels}")), NOW).unwrap();
        let err = check_start(&dir, "work", &spec, &cfg, NOW).unwrap_err();
        assert_eq!(err.status(), 403);
        assert!(err.to_string().contains("boot.firmware"), "{err}");
        let listed = format!(
            "[boot]\n{kernels}firmware = [\"{rom_hash}\"]\ndisk_images = [\"{image_hash}\"]\n"
        );
        apply(&dir, &signed(&key, 2, &listed), NOW).unwrap();
        check_start(&dir, "work", &spec, &cfg, NOW).unwrap();
        // Another ROM, a disk from another image, an image never recorded: refused.
        std::fs::write(&rom, b"rom two").unwrap();
        let err = check_start(&dir, "work", &spec, &cfg, NOW).unwrap_err();
        assert!(err.to_string().contains("boot.firmware"), "{err}");
        std::fs::write(&rom, b"rom one").unwrap();
        for recorded in [Some("d".repeat(64)), None] {
            spec.disks[0].image_sha256 = recorded;
            let err = check_start(&dir, "work", &spec, &cfg, NOW).unwrap_err();
            assert!(err.to_string().contains("boot.disk_images"), "{err}");
        }
    }

    #[test]
    fn an_expired_policy_stops_starts_and_resumes() {
        let (t, dir, key) = setup();
        let kernel = t.path().join("vmlinux");
        std::fs::write(&kernel, b"k").unwrap();
        let env = signed(&key, 1, &format!("expires_at = {}\n", NOW + 10));
        apply(&dir, &env, NOW).unwrap();
        let cfg = VmConfig::new(kernel);
        let spec = work_spec();
        check_start(&dir, "work", &spec, &cfg, NOW + 9).unwrap();
        check_resume(&dir, "work", NOW + 9).unwrap();
        assert!(check_start(&dir, "work", &spec, &cfg, NOW + 10).is_err());
        let err = check_resume(&dir, "work", NOW + 10).unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn the_policy_channels_replace_the_specs() {
        let (_t, dir, key) = setup();
        let mut spec =
            ProfileSpec::from_template("work", "work", crate::spec::TemplateBoot::Probe).unwrap();
        spec.channels.clipboard_to = vec!["personal".into()];
        assert_eq!(
            effective_channels(&dir, &spec).unwrap().clipboard_to,
            vec!["personal".to_string()]
        );
        apply(&dir, &signed(&key, 1, "[channels]\nfiles_from = []\n"), NOW).unwrap();
        let c = effective_channels(&dir, &spec).unwrap();
        assert!(c.clipboard_to.is_empty());
        assert_eq!(c.files_from, Some(vec![]));
        assert!(screen(&dir, "work").unwrap().capture);
        apply(&dir, &signed(&key, 2, "[screen]\ncapture = false\n"), NOW).unwrap();
        assert!(!screen(&dir, "work").unwrap().capture);
    }

    #[test]
    fn the_network_section_becomes_the_vmms_filter() {
        use vmm_api::config::{FilterAction, FilterProtocol};
        let (_t, dir, key) = setup();
        assert_eq!(net_filter(&dir, "work").unwrap(), None);
        // Allow everything, no rules: no filter at all.
        apply(
            &dir,
            &signed(&key, 1, "[network]\ndefault = \"allow\"\n"),
            NOW,
        )
        .unwrap();
        assert_eq!(net_filter(&dir, "work").unwrap(), None);
        let net = "[network]\ndefault = \"deny\"\nrules = [{ action = \"allow\", cidr = \
                   \"10.0.0.0/8\", protocol = \"tcp\", ports = \"443-444\" }]\n";
        apply(&dir, &signed(&key, 2, net), NOW).unwrap();
        let f = net_filter(&dir, "work").unwrap().unwrap();
        assert_eq!(f.default, FilterAction::Deny);
        assert_eq!(f.rules.len(), 1);
        assert_eq!(f.rules[0].action, FilterAction::Allow);
        assert_eq!(f.rules[0].cidr.as_deref(), Some("10.0.0.0/8"));
        assert_eq!(f.rules[0].protocol, FilterProtocol::Tcp);
        assert_eq!(f.rules[0].ports, Some([443, 444]));
        assert!(f.dns_servers.is_empty() && f.rules[0].name.is_none());
        // A rule by name goes with the resolvers it trusts.
        let net = "[network]\ndefault = \"deny\"\ndns_servers = [\"10.0.0.53\"]\nrules = [{ \
                   action = \"allow\", name = \"*.corp.example\", protocol = \"tcp\" }]\n";
        apply(&dir, &signed(&key, 3, net), NOW).unwrap();
        let f = net_filter(&dir, "work").unwrap().unwrap();
        assert_eq!(f.dns_servers, ["10.0.0.53"]);
        assert_eq!(
            (f.rules[0].name.as_deref(), f.rules[0].cidr.as_deref()),
            (Some("*.corp.example"), None)
        );
    }

    #[test]
    fn a_policy_for_a_missing_profile_or_without_a_trusted_key_is_refused() {
        let (_t, dir, key) = setup();
        let doc = format!("version = 1\nissued_at = {NOW}\nprofile = \"nope\"\n");
        let env = policy::sign(doc.as_bytes(), &key).unwrap();
        assert_eq!(apply(&dir, &env, NOW).unwrap_err().status(), 404);
        std::fs::remove_file(dir.org_key()).unwrap();
        let err = apply(&dir, &signed(&key, 1, ""), NOW).unwrap_err();
        assert!(
            err.to_string().contains("trusts no organisation key"),
            "{err}"
        );
        assert!(!dir.policy("work").exists());
    }
}
