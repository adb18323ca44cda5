//! `pocketvisor policy ...`: the organisation's signed IT policies (docs/policy.md).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use handset::client::ClientError;
use handset::org_policy::{PolicyApplied, PolicyStatus};
use policy::{OrgPublicKey, OrgSecretKey, Verified};

use crate::failure::Failure;

/// Create, sign, check and apply the organisation's IT policies (docs/policy.md).
#[derive(Args, Debug)]
#[command(after_help = "\
IT writes a policy (TOML, docs/policy.md) for one profile and signs it with the organisation's
key; the handset, which trusts that organisation's public key, verifies every policy before
reading it and refuses unsigned, changed, wrongly signed, expired and older ones.

EXAMPLE (IT):
  pocketvisor policy keygen -o org.key            # writes org.key and org.key.pub
  pocketvisor policy sign --key org.key work.toml -o work.pvpol
EXAMPLE (handset):
  pocketvisor policy trust org.key.pub            # or: pocketvisor handset --org-key FILE
  pocketvisor policy apply work.pvpol
  pocketvisor profile policy work                 # what is in force")]
pub struct PolicyArgs {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(Subcommand, Debug)]
enum PolicyCmd {
    /// Create an organisation signing key (FILE, mode 0600) and its public key (FILE.pub).
    Keygen {
        /// The signing key file to create (never overwritten).
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Check a policy document and sign it into an envelope.
    Sign {
        /// The organisation's signing key (from `policy keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The policy document (TOML).
        policy: PathBuf,
        /// The signed policy to write.
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Verify a signed policy's signature and document (exit 4 if refused).
    Verify {
        /// The signed policy.
        file: PathBuf,
        #[command(flatten)]
        key: KeySource,
    },
    /// Verify a signed policy, then print it.
    Show {
        /// The signed policy.
        file: PathBuf,
        #[command(flatten)]
        key: KeySource,
    },
    /// Make this handset trust an organisation's public key.
    #[command(after_help = "\
The key is stored in <state-dir>/org.pub. A handset trusts one organisation: replacing a
different key needs --replace. `pocketvisor handset --org-key FILE` does the same at start.")]
    Trust {
        /// The public key file (FILE.pub from `policy keygen`) or the key itself
        /// (pvpol-public-...).
        key: String,
        /// Replace a different key already trusted.
        #[arg(long)]
        replace: bool,
        /// State directory [default: $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Apply a signed policy to the profile it names (all or nothing), through the daemon.
    #[command(after_help = "\
The policy must verify under the trusted key, name an existing profile, be unexpired and have a
higher version than the one in force; otherwise nothing changes (exit 4). It takes effect at
the profile's next start (boot rules) and next transfer (channels); a running guest goes on.
The daemon (DIR/handset.sock) applies it and records the attempt in its audit log
(`policy-apply`: applied or refused, with the version and the reason). With no daemon running
it is applied to DIR directly under the daemon's lock and recorded in the same log.")]
    Apply {
        /// The signed policy.
        file: PathBuf,
        /// State directory [default: $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// Which key verifies: `--org-key`, else the state directory's trusted key.
#[derive(Args, Debug)]
struct KeySource {
    /// The organisation's public key: a file or the key itself (pvpol-public-...)
    /// [default: the key the handset in --state-dir trusts].
    #[arg(long, value_name = "KEY")]
    org_key: Option<String>,
    /// State directory whose trusted key verifies [default: $POCKETVISOR_STATE_DIR, else
    /// /var/lib/pocketvisor].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
}

/// Runs `pocketvisor policy ...`.
pub fn main(a: PolicyArgs) -> Result<i32> {
    match a.cmd {
        PolicyCmd::Keygen { output } => keygen(&output),
        PolicyCmd::Sign {
            key,
            policy,
            output,
        } => sign(&key, &policy, &output),
        PolicyCmd::Verify { file, key } => {
            let v = verify_file(&file, &key)?;
            if a.json {
                print_policy(&v, true)?;
            } else {
                outln!(
                    "{}: valid: version {} for profile {:?}{}",
                    file.display(),
                    v.policy.version,
                    v.policy.profile,
                    expiry_note(&v.policy)
                );
            }
            Ok(0)
        }
        PolicyCmd::Show { file, key } => {
            let v = verify_file(&file, &key)?;
            print_policy(&v, a.json)?;
            Ok(0)
        }
        PolicyCmd::Trust {
            key,
            replace,
            state_dir,
        } => {
            let key = read_public_key(&key)?;
            let dir = handset::StateDir::resolve(state_dir.as_deref())?;
            let changed = handset::org_policy::trust(&dir, &key, replace)?;
            let verb = if changed {
                "now trusts"
            } else {
                "already trusts"
            };
            outln!(
                "{} {verb} organisation key {}",
                dir.root().display(),
                key.fingerprint()
            );
            Ok(0)
        }
        PolicyCmd::Apply { file, state_dir } => {
            let dir = handset::StateDir::resolve(state_dir.as_deref())?;
            let bytes = read_envelope(&file)?;
            let applied = apply_through_daemon(&dir, &bytes)?;
            if a.json {
                outln!("{}", serde_json::to_string_pretty(&applied)?);
                return Ok(0);
            }
            let what = match (applied.changed, applied.replaced) {
                (false, _) => "already in force".to_string(),
                (true, Some(old)) => format!("applied (replaces version {old})"),
                (true, None) => "applied".to_string(),
            };
            outln!(
                "policy version {} for profile {:?}: {what}",
                applied.version,
                applied.profile
            );
            Ok(0)
        }
    }
}

/// Applies through the daemon's API (`POST /v1/policies`), which verifies and audits; with
/// no daemon running, applies to the state directory under the daemon's lock and records the
/// same audit entry in its log.
fn apply_through_daemon(dir: &handset::StateDir, envelope: &[u8]) -> Result<PolicyApplied> {
    let client = handset::client::Client::new(&dir.socket());
    // A file that is not UTF-8 is no signed policy: sent as is (lossily), it fails the
    // daemon's verification and is refused and audited like any other bad file.
    let req = handset::org_policy::ApplyPolicy {
        envelope: String::from_utf8_lossy(envelope).into_owned(),
    };
    match client.call::<PolicyApplied>("POST", "/v1/policies", Some(&req)) {
        Ok(applied) => Ok(applied),
        Err(ClientError::NotRunning(_)) => {
            eprintln!(
                "pocketvisor: the handset daemon is not running: applying to {} directly, \
                 holding the daemon's lock, audited in its log",
                dir.root().display()
            );
            Ok(handset::org_policy::apply_offline(
                dir,
                envelope,
                handset::policy_clock::now(),
            )?)
        }
        Err(e) => Err(e.into()),
    }
}

/// `pocketvisor profile policy NAME`: the policy in force, from the daemon
/// (`GET /v1/profiles/NAME/policy`), or read from the state directory when none runs.
pub fn show_in_force(
    state_dir: Option<&Path>,
    socket: Option<&Path>,
    name: &str,
    json: bool,
) -> Result<i32> {
    let dir = handset::StateDir::resolve(state_dir)?;
    let socket = socket.map_or_else(|| dir.socket(), Path::to_path_buf);
    let path = format!("/v1/profiles/{name}/policy");
    let none: Option<&()> = None;
    let status: PolicyStatus = match handset::client::Client::new(&socket).call("GET", &path, none)
    {
        Ok(s) => s,
        Err(ClientError::NotRunning(_)) => {
            eprintln!(
                "pocketvisor: the handset daemon is not running: reading {} directly",
                dir.root().display()
            );
            if !dir.spec(name).is_file() {
                return Err(Failure::NotFound(format!("no profile named {name:?}")).into());
            }
            handset::org_policy::status(&dir, name, handset::policy_clock::now())?
        }
        Err(e) => return Err(e.into()),
    };
    if json {
        outln!("{}", serde_json::to_string(&status)?);
        return Ok(0);
    }
    match &status.policy {
        Some(p) => {
            print_document(p)?;
            if let Some(until) = status.offline_until {
                let contact = status.last_contact.map_or_else(|| "never".to_string(), utc);
                outln!(
                    "offline limit: the profile locks at {} unless the handset reaches its MDM \
                     first (last contact: {contact})",
                    utc(until)
                );
            }
        }
        None => outln!(
            "profile {name:?} has no IT policy in force: its spec's channels apply and any \
             kernel boots"
        ),
    }
    Ok(0)
}

fn keygen(output: &Path) -> Result<i32> {
    let key = OrgSecretKey::generate();
    let public = key.public().encode();
    let pub_path = PathBuf::from(format!("{}.pub", output.display()));
    if pub_path.exists() {
        anyhow::bail!("{} exists; not overwriting it", pub_path.display());
    }
    let secret = zeroize::Zeroizing::new(format!(
        "# pocketvisor organisation policy signing key: keep it secret.\n\
         # public key: {public}\n{}\n",
        &*key.encode()
    ));
    write_new(output, secret.as_bytes(), 0o600)?;
    if let Err(e) = write_new(&pub_path, format!("{public}\n").as_bytes(), 0o644) {
        let _ = std::fs::remove_file(output);
        return Err(e);
    }
    eprintln!(
        "pocketvisor: wrote the signing key to {} (mode 0600) and its public key to {}:",
        output.display(),
        pub_path.display()
    );
    outln!("{public}");
    Ok(0)
}

fn sign(key: &Path, doc: &Path, output: &Path) -> Result<i32> {
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(key).with_context(|| format!("cannot read {}", key.display()))?,
    );
    let key = OrgSecretKey::decode(&text).with_context(|| key.display().to_string())?;
    let body = std::fs::read(doc).with_context(|| format!("cannot read {}", doc.display()))?;
    let envelope = policy::sign(&body, &key).with_context(|| doc.display().to_string())?;
    policy::store::write_atomic(output, &envelope)?;
    let v = policy::verify(&envelope, &key.public())?;
    outln!(
        "{}: version {} for profile {:?}, signed by {}",
        output.display(),
        v.policy.version,
        v.policy.profile,
        key.public().fingerprint()
    );
    Ok(0)
}

fn verify_file(file: &Path, source: &KeySource) -> Result<Verified> {
    let key = match &source.org_key {
        Some(k) => read_public_key(k)?,
        None => {
            let dir = handset::StateDir::resolve(source.state_dir.as_deref())?;
            handset::org_policy::trusted_key(&dir)?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no --org-key given and {} trusts no organisation key",
                    dir.root().display()
                )
            })?
        }
    };
    let bytes = read_envelope(file)?;
    policy::verify(&bytes, &key).with_context(|| file.display().to_string())
}

fn read_envelope(file: &Path) -> Result<Vec<u8>> {
    policy::store::read_bounded(file).with_context(|| format!("cannot read {}", file.display()))
}

/// A public key given as `pvpol-public-...` or as a file holding one.
fn read_public_key(arg: &str) -> Result<OrgPublicKey> {
    if arg.starts_with("pvpol-") {
        return Ok(OrgPublicKey::decode(arg)?);
    }
    let text = std::fs::read_to_string(arg).with_context(|| format!("cannot read {arg}"))?;
    OrgPublicKey::decode(&text).with_context(|| arg.to_string())
}

fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    if let Err(e) = f.write_all(data).and_then(|()| f.sync_all()) {
        let _ = std::fs::remove_file(path);
        return Err(e).with_context(|| format!("cannot write {}", path.display()));
    }
    Ok(())
}

fn expiry_note(p: &policy::Policy) -> String {
    let now = policy::unix_now();
    match p.expires_at {
        None => ", no expiry".into(),
        Some(exp) if p.is_expired(now) => format!(", EXPIRED at {}", utc(exp)),
        Some(exp) => format!(", expires {}", utc(exp)),
    }
}

fn print_policy(v: &Verified, json: bool) -> Result<()> {
    let p = &v.policy;
    if json {
        let now = policy::unix_now();
        outln!(
            "{}",
            serde_json::json!({
                "profile": p.profile,
                "policy": p,
                "expired": p.is_expired(now),
            })
        );
        return Ok(());
    }
    print_document(p)
}

/// A verified policy as its header comment and TOML.
fn print_document(p: &policy::Policy) -> Result<()> {
    outln!(
        "# policy version {} for profile {:?}, issued {}{}",
        p.version,
        p.profile,
        utc(p.issued_at),
        expiry_note(p)
    );
    out!("{}", toml::to_string(p).context("cannot print the policy")?);
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS UTC` for unix seconds.
fn utc(secs: u64) -> String {
    let secs = i64::try_from(secs).unwrap_or(i64::MAX);
    format!("{} UTC", crate::civil_time::utc_seconds(secs))
}

#[cfg(test)]
mod tests {
    use super::utc;

    #[test]
    fn unix_times_print_as_utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_764_856_800), "2025-12-04 14:00:00 UTC");
    }
}
