//! `pocketvisor import`: a `.pvp` file into a handset state directory.
//!
//! Order of work, so that a failure (or kill -9) at any point leaves the target unchanged:
//! 1. refuse a `--name` that is taken;
//! 2. decrypt and verify everything into a hidden staging directory next to the profiles
//!    (`profiles/.import-<pid>-<n>`; `vault::import` checks the key and the header before it
//!    creates anything, writes to a temporary directory and renames it when every chunk
//!    verified), then check it against the manifest and refuse a name clash;
//! 3. rename the staging directory to `profiles/<name>` (refusing to replace anything) and
//!    register it in `handset.db` (a running daemon reads the registry on every request).
//!
//! Staging directories of dead import processes are removed by the next import.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use handset::db::{Db, Log};
use handset::{ProfileSpec, StateDir};
use vault::Unlock;

use super::layout::{self, ProfileConfig, SPEC_ENTRY};
use super::progress::{self, Reporter};
use super::secret::{self, PassphraseArgs};

use handset::leftovers::{
    IMPORT_PENDING_MARKER as PENDING_MARKER, IMPORT_STAGING_PREFIX as STAGING_PREFIX,
};

/// Recreate a profile from a portable file.
#[derive(Args, Debug)]
#[command(after_help = "\
The whole file is decrypted and verified before the profile appears; a wrong passphrase or
key, a damaged, truncated or foreign file, or a name that is already taken is one error and
changes nothing. The profile is registered with the handset (running or not) in the state it
was exported in: `pocketvisor profile resume NAME` continues a suspended one where it
stopped, `start` boots a stopped one.

A governed profile (one the file carries an organisation policy for) is imported only when
its policy verifies under this handset's trusted organisation key (`pocketvisor policy
trust`), under the profile's own name, unexpired and no older than a version accepted here
before; otherwise nothing is imported.

EXAMPLE:
  pocketvisor import work.pvp --state-dir /var/lib/pocketvisor
  pocketvisor profile resume work")]
pub struct ImportArgs {
    /// The portable profile file.
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// State directory [default: $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Import under this name instead of the exported one.
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    #[command(flatten)]
    passphrase: PassphraseArgs,
    /// Open the file with this identity (from `pocketvisor keygen`) instead of a passphrase.
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    identity: Option<PathBuf>,
    /// Print JSON progress events (one per line) on stdout instead of a progress bar.
    #[arg(long)]
    pub(crate) json: bool,
}

/// Removes what this import created unless disarmed.
struct Cleanup {
    paths: Vec<PathBuf>,
}

impl Cleanup {
    fn disarm(mut self) {
        self.paths.clear();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in self.paths.iter().rev() {
            let _ = if p.is_dir() {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
        }
    }
}

/// Creates `dir` and its missing parents; returns the ones it created, outermost first.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = dir;
    while !p.exists() {
        missing.push(p.to_path_buf());
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    missing.reverse();
    for m in &missing {
        std::fs::create_dir(m).with_context(|| format!("cannot create {}", m.display()))?;
    }
    Ok(missing)
}

/// Renames `from` to `to`, failing if `to` exists.
fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("path contains a NUL byte"))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        // The raw system call: musl's libc (the static aarch64 build) has no renameat2().
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// What this host lacks for the imported profile (its kernel or initrd or firmware, guest
/// assets in `<state-dir>/assets/`, or its TAP interface).
fn host_warnings(dir: &StateDir, spec: &ProfileSpec) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(f) = spec.firmware.as_ref().filter(|f| !dir.asset(f).is_file()) {
        w.push(format!(
            "firmware {f} does not exist here: the profile can neither start nor resume (a \
             firmware guest's ROM is mapped again at resume)"
        ));
    } else if spec.firmware.is_none()
        && spec.kernel != handset::spec::PROBE_KERNEL
        && !dir.asset(&spec.kernel).is_file()
    {
        w.push(format!(
            "kernel {} does not exist here: resume works, a cold start will not",
            spec.kernel
        ));
    }
    if let Some(i) = spec
        .initrd
        .as_ref()
        .filter(|i| !dir.asset(&i.to_string_lossy()).is_file())
    {
        w.push(format!(
            "initrd {} does not exist here: resume works, a cold start will not",
            i.display()
        ));
    }
    if let Some(tap) = spec
        .net
        .as_ref()
        .filter(|t| !Path::new("/sys/class/net").join(t).exists())
    {
        w.push(format!(
            "the TAP interface {tap} does not exist here: create it before starting the profile"
        ));
    }
    w
}

fn unlock(a: &ImportArgs) -> Result<Unlock> {
    match &a.identity {
        Some(f) => Ok(Unlock::Identity(secret::read_identity(f)?)),
        None => Ok(Unlock::Passphrase(
            a.passphrase.get_or_prompt(false).map_err(|e| {
                anyhow::anyhow!(
                    "{e:#}; a file exported for a recipient key opens with --identity KEYFILE"
                )
            })?,
        )),
    }
}

/// Runs `pocketvisor import`. A refused import (a file that does not open or is damaged, a
/// spec that breaks the handset's rules, a name taken) changes nothing but the audit log of
/// a state directory that already has one: one `import-refused` record with the reason.
pub fn main(a: ImportArgs) -> Result<i32> {
    let dir = StateDir::resolve(a.state_dir.as_deref())?;
    let mut audited = false;
    let result = import(&a, &dir, &mut audited);
    if let Err(e) = &result {
        if !audited {
            let who = a
                .name
                .as_deref()
                .filter(|n| handset::spec::check_name("", n).is_ok())
                .unwrap_or("-");
            audit_refusal(&dir, who, &format!("{}: {e:#}", a.file.display()));
        }
    }
    result
}

/// Records a refused import in the audit log, if the state directory has one (a refused
/// import creates no state directory).
fn audit_refusal(dir: &StateDir, who: &str, detail: &str) {
    if !dir.db().is_file() {
        return;
    }
    if let Ok(db) = Db::open(&dir.db()) {
        let _ = db.record(Log::Audit, who, "import-refused", detail);
    }
}

fn import(a: &ImportArgs, dir: &StateDir, audited: &mut bool) -> Result<i32> {
    let file = a.file.display().to_string();
    let taken = |name: &str| {
        anyhow::anyhow!(
            "profile {name:?} already exists in {}: import it under another name with --name \
             NEW",
            dir.root().display()
        )
    };
    let clash = |name: &str| -> Result<bool> {
        Ok(dir.profile(name).exists()
            || (dir.db().is_file() && Db::open(&dir.db())?.profile(name)?.is_some()))
    };
    // What a killed import left (a staging directory, a directory renamed into place but
    // not registered) goes first.
    handset::leftovers::sweep_imports(dir, None)?;
    // With --name the clash is known before the work; else once the manifest is read (the
    // key is derived once: no separate inspect pass).
    if let Some(n) = &a.name {
        handset::spec::check_name("profile name", n)?;
        if clash(n)? {
            return Err(taken(n));
        }
    }
    let options = vault::ImportOptions {
        threads: secret::threads()?,
        ..vault::ImportOptions::default()
    };
    let unlock = unlock(a)?;

    // From here on, everything made is removed on failure.
    let mut cleanup = Cleanup {
        paths: create_dirs(&dir.profiles())?,
    };
    let staging = dir.profiles().join(format!(
        "{STAGING_PREFIX}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    cleanup.paths.push(staging.clone());

    let label = a.name.clone().unwrap_or_else(|| file.clone());
    let mut reporter = Reporter::new(a.json, &format!("importing {label}"));
    let imported = vault::import_with(&a.file, &unlock, &staging, &options, &mut |p| {
        reporter.update(p)
    });
    reporter.finished();
    let manifest = match imported {
        Ok(m) => m,
        Err(e) => {
            reporter.abandon();
            return Err(e).context(format!("cannot import {file}"));
        }
    };
    drop(unlock);
    let config = match ProfileConfig::from_manifest(&manifest.config) {
        Ok(c) => c,
        Err(e) => {
            // A spec that breaks the handset's rules (a free host path as kernel or initrd)
            // is refused and recorded; the staging directory goes with `cleanup`.
            let detail = format!("{file}: {e:#}");
            let who = a.name.as_deref().unwrap_or(&manifest.name);
            let who = if handset::spec::check_name("", who).is_ok() {
                who
            } else {
                "-"
            };
            audit_refusal(dir, who, &detail);
            *audited = true;
            return Err(e).context(format!("cannot import {file}"));
        }
    };
    let name = a.name.clone().unwrap_or_else(|| manifest.name.clone());
    handset::spec::check_name("profile name", &name)?;
    let target = dir.profile(&name);
    if clash(&name)? {
        return Err(taken(&name));
    }
    layout::check_entries(manifest.entries.iter().map(|e| e.name.as_str()), &config)
        .with_context(|| format!("cannot import {file}"))?;
    layout::check_imported(&staging, &config).with_context(|| format!("cannot import {file}"))?;
    // A governed profile's policy is verified under this handset's organisation key, for the
    // name it is imported under; refused, nothing is created (the staging goes with cleanup).
    let policy = if config.governed() {
        let checked = policy::store::read_bounded(&staging.join(layout::POLICY_ENTRY))
            .map_err(anyhow::Error::new)
            .and_then(|envelope| {
                Ok(handset::policy_travel::check_imported(
                    dir,
                    &name,
                    &envelope,
                    policy::unix_now(),
                )?)
            });
        match checked {
            Ok(v) => Some(v),
            Err(e) => {
                // Recorded under the name: the policy (or the handset) refused it, the name
                // itself is valid.
                audit_refusal(dir, &name, &format!("{file}: {e:#}"));
                *audited = true;
                return Err(e).context(format!("cannot import {file}"));
            }
        }
    } else {
        None
    };
    if name != config.spec.name {
        let spec = ProfileSpec {
            name: name.clone(),
            ..config.spec.clone()
        };
        handset::state_dir::write_atomic(&staging.join(SPEC_ENTRY), spec.to_toml()?.as_bytes())?;
    }
    // An encrypted profile's data key, wrapped under this handset's device key for the name
    // it is imported under (the file's copy was sealed under the file's key).
    if let Some(key) = &config.data_key {
        handset::disk_keys::store_profile_key(dir, &staging, &name, &key.0)
            .context("cannot store the profile's data key")?;
    }
    handset::fault::kill_point("import-staged");
    let run = staging.join("run");
    std::fs::create_dir(&run).with_context(|| format!("cannot create {}", run.display()))?;

    let marker = staging.join(PENDING_MARKER);
    std::fs::write(&marker, std::process::id().to_string())
        .with_context(|| format!("cannot write {}", marker.display()))?;

    // Register: the directory first (a row always has its files), then the row.
    let ino = std::fs::metadata(&staging)?.ino();
    rename_no_replace(&staging, &target).map_err(|e| {
        if e.raw_os_error() == Some(libc::EEXIST) || e.raw_os_error() == Some(libc::ENOTEMPTY) {
            taken(&name)
        } else {
            anyhow::Error::new(e).context(format!("cannot create {}", target.display()))
        }
    })?;
    handset::state_dir::sync_dir(&dir.profiles())?;
    handset::fault::kill_point("import-renamed");
    // The row, its state and its records in one transaction: a kill cannot leave a
    // suspended profile registered as stopped.
    let registered = (|| -> Result<u32> {
        let db = Db::open(&dir.db())?;
        let detail = match &policy {
            Some(v) => format!(
                "imported from {file} (governed: policy version {} verified)",
                v.policy.version
            ),
            None => format!("imported from {file}"),
        };
        db.atomically(|db| {
            let cid = db.insert_profile_with_cid(&name, config.vsock_cid)?;
            db.set_state(&name, config.state.as_str(), None, &detail)?;
            db.record(Log::Events, &name, "imported", &detail)?;
            db.record(Log::Audit, &name, "import", &detail)?;
            Ok(cid)
        })
        .map_err(|e| match db.profile(&name) {
            Ok(Some(_)) => taken(&name),
            _ => e.into(),
        })
    })();
    let cid = match registered {
        Ok(cid) => cid,
        Err(e) => {
            // Take back our directory (only if it still is ours) so that nothing changed.
            if std::fs::metadata(&target).map(|m| m.ino()).ok() == Some(ino) {
                let _ = rename_no_replace(&target, &staging);
            }
            reporter.abandon();
            return Err(e).context(format!("cannot register profile {name:?}"));
        }
    };
    cleanup.disarm();
    handset::fault::kill_point("import-registered");
    if let Some(v) = &policy {
        let recorded = handset::org_policy::trusted_key(dir).and_then(|key| match key {
            Some(key) => {
                handset::policy_travel::record_accepted(dir, &name, &key, v.policy.version)
            }
            None => Ok(()),
        });
        if let Err(e) = recorded {
            eprintln!(
                "pocketvisor: warning: cannot record policy version {}: {e}",
                v.policy.version
            );
        }
    }
    let _ = std::fs::remove_file(target.join(PENDING_MARKER));

    for w in host_warnings(dir, &config.spec) {
        if a.json {
            progress::json_line(&serde_json::json!({"event": "warning", "message": w}));
        } else {
            eprintln!("pocketvisor: warning: {w}");
        }
    }

    let secs = reporter.elapsed();
    let key_secs = reporter.key_seconds().unwrap_or(0.0);
    let size = std::fs::metadata(&a.file).map(|m| m.len()).unwrap_or(0);
    reporter.done(serde_json::json!({
        "profile": name,
        "state": config.state.as_str(),
        "state_dir": dir.root().display().to_string(),
        "file_size": size,
        "vsock_cid": cid,
    }));
    if !a.json {
        outln!(
            "imported {name} ({}) into {}: {} in {:.2} s ({:.0} MB/s; key derivation {:.2} \
             s); next: pocketvisor profile --state-dir {} {} {name}",
            config.state.as_str(),
            dir.root().display(),
            progress::mib(size),
            secs.as_secs_f64(),
            progress::rate(size, secs),
            key_secs,
            dir.root().display(),
            match config.state {
                layout::SavedState::Suspended => "resume",
                layout::SavedState::Stopped => "start",
            }
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_for_what_the_host_lacks() {
        let dir = StateDir::new(Path::new("/nonexistent/state")).unwrap();
        let mut spec =
            ProfileSpec::from_template("work", "w", handset::spec::TemplateBoot::Probe).unwrap();
        assert!(host_warnings(&dir, &spec).is_empty());
        spec.kernel = "vmlinux".into();
        spec.net = Some("pvnotap0".into());
        let w = host_warnings(&dir, &spec);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("kernel vmlinux") && w[1].contains("pvnotap0"));
    }

    #[test]
    fn staging_sweep_and_no_replace_rename() {
        let base = std::env::temp_dir().join(format!("pv-import-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let state = StateDir::new(&base).unwrap();
        let root = state.profiles();
        // No process has a pid this large (pid_max is at most 2^22).
        let dead = root.join(".import-999999999-1");
        let dead_vault = root.join("..import-999999999-1.import-00ff");
        let live = root.join(format!(".import-{}-2", std::process::id()));
        let profile = root.join("work");
        // Renamed into place by a killed import, never registered (no handset.db here).
        let unregistered = root.join("half");
        for d in [&dead, &dead_vault, &live, &profile, &unregistered] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(unregistered.join(PENDING_MARKER), "999999999").unwrap();
        handset::leftovers::sweep_imports(&state, None).unwrap();
        assert!(!dead.exists() && !dead_vault.exists() && !unregistered.exists());
        assert!(live.exists() && profile.exists());

        let e = rename_no_replace(&live, &profile).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
        assert!(live.exists());
        rename_no_replace(&live, &root.join("new")).unwrap();
        assert!(root.join("new").is_dir() && !live.exists());
        std::fs::remove_dir_all(&base).unwrap();
    }
}
