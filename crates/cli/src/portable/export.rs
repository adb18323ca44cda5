//! `pocketvisor export`: a handset profile into one encrypted `.pvp` file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use handset::client::{Client, ClientError};
use handset::db::{Db, ProfileRow};
use handset::{ProfileInfo, ProfileSpec, ProfileState, StateDir};
use vault::{ExportOptions, KeySpec, Manifest, Phase, Progress, SealedKeys, VaultError};

use super::layout::{self, ProfileConfig, SavedState, CONFIG_FORMAT, GOVERNED_FORMAT};
use super::progress::{self, Reporter};
use super::secret::{self, PassphraseArgs};

/// Write a profile (spec, disks, snapshot) to one encrypted portable file.
#[derive(Args, Debug)]
#[command(after_help = "\
The key is derived first (a passphrase's argon2id takes seconds); then a running (or paused)
profile is suspended through the handset daemon, which must then be running, and its files
are written. The profile is only read. The file is written under a temporary name and renamed
when complete, so an interrupted export never leaves a partial file under the final name;
Ctrl-C leaves the profile as it was (resumed again if this export suspended it).

The profile MOVES: afterwards it stays here, marked as moved to FILE, and `profile start` or
`resume` refuse it (so the guest does not run twice) until given --reclaim. With --keep (a
copy, e.g. a backup) or --resume it is not marked. A stopped profile is exported without a
snapshot and boots afresh after import.

Keys: a passphrase (--passphrase-file, $POCKETVISOR_PASSPHRASE, or typed twice at the
terminal) and/or any number of --recipient public keys (from `pocketvisor keygen`). With
only --recipient, no passphrase is asked.

EXAMPLE:
  pocketvisor export work -o work.pvp --recipient pvp-public-...
  pocketvisor import work.pvp --state-dir /var/lib/pocketvisor --name work2")]
pub struct ExportArgs {
    /// The profile to export.
    #[arg(value_name = "PROFILE")]
    profile: String,
    /// The file to write (an existing file is refused unless --force).
    #[arg(short, long, value_name = "FILE")]
    output: PathBuf,
    /// Replace FILE if it exists.
    #[arg(long)]
    force: bool,
    /// State directory [default: $POCKETVISOR_STATE_DIR, else /var/lib/pocketvisor].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    passphrase: PassphraseArgs,
    /// A public key (pvp-public-...) whose identity can open the file. Repeatable.
    #[arg(long, value_name = "KEY")]
    recipient: Vec<String>,
    /// Print JSON progress events (one per line) on stdout instead of a progress bar.
    #[arg(long)]
    pub(crate) json: bool,
    /// If this export suspends a running profile, resume it afterwards (the file is then a
    /// copy of that moment, e.g. a backup; by default the profile stays suspended). Implies
    /// --keep.
    #[arg(long)]
    resume: bool,
    /// Export a copy: do not mark the profile as moved (it may go on here too).
    #[arg(long)]
    keep: bool,
}

/// Set by SIGINT/SIGTERM while an export runs; the vault stops at the next chunk.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// Catches SIGINT and SIGTERM into [`INTERRUPTED`].
fn catch_interrupts() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_interrupt as *const () as libc::sighandler_t) };
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

/// The exit status of an export stopped by Ctrl-C (128 + SIGINT).
const EXIT_INTERRUPTED: i32 = 130;

/// A random tag for the temporary file's name.
fn rand_tag() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return (u64::from(std::process::id()) << 32) | u64::from(nanos);
    }
    u64::from_le_bytes(b)
}

/// The parts of a row that change when the profile's files may change.
fn fingerprint(row: &ProfileRow) -> (String, Option<i64>, Option<i32>) {
    (row.state.clone(), row.started_ms, row.pid)
}

fn read_row(db: &Db, name: &str, dir: &StateDir) -> Result<ProfileRow> {
    db.profile(name)?.ok_or_else(|| {
        crate::failure::Failure::NotFound(format!(
            "no profile {name:?} in {}",
            dir.root().display()
        ))
        .into()
    })
}

/// Asks the daemon to `suspend` or `resume` the profile.
fn lifecycle(dir: &StateDir, name: &str, action: &str, json: bool) -> Result<()> {
    let none: Option<&()> = None;
    let client = Client::new(&dir.socket());
    let r: Result<ProfileInfo, ClientError> =
        client.call("POST", &format!("/v1/profiles/{name}/{action}"), none);
    match r {
        Ok(_) => {
            let event = if action == "suspend" {
                "suspended"
            } else {
                "resumed"
            };
            if json {
                progress::json_line(&serde_json::json!({"event": event, "profile": name}));
            } else {
                eprintln!("pocketvisor: {event} {name}");
            }
            Ok(())
        }
        Err(ClientError::NotRunning(_)) => bail!(
            "profile {name:?} is running but its handset daemon does not answer: start it \
             (`pocketvisor handset --state-dir {}`) so it can suspend the profile, then export \
             again",
            dir.root().display()
        ),
        Err(e) => Err(e).context(format!("cannot {action} profile {name:?}")),
    }
}

/// Runs `pocketvisor export`.
pub fn main(a: ExportArgs) -> Result<i32> {
    handset::spec::check_name("profile name", &a.profile)?;
    if !a.force && std::fs::symlink_metadata(&a.output).is_ok() {
        bail!(
            "{} exists: give --force to replace it, or another -o FILE",
            a.output.display()
        );
    }
    let dir = StateDir::resolve(a.state_dir.as_deref())?;
    if !dir.db().is_file() {
        bail!(
            "{} is not a handset state directory (no handset.db)",
            dir.root().display()
        );
    }
    let mut recipients = Vec::with_capacity(a.recipient.len());
    for r in &a.recipient {
        recipients.push(vault::decode_public(r).with_context(|| format!("--recipient {r}"))?);
    }
    // Ask for the passphrase before touching the profile.
    let mut keys = Vec::new();
    let passphrase = if recipients.is_empty() {
        Some(a.passphrase.get_or_prompt(true)?)
    } else {
        a.passphrase.given_new()?
    };
    if let Some(p) = passphrase {
        keys.push(KeySpec::Passphrase {
            passphrase: p,
            params: secret::kdf_params()?,
        });
    }
    keys.extend(recipients.into_iter().map(KeySpec::Recipient));
    let threads = secret::threads()?;
    let output = std::path::absolute(&a.output).unwrap_or_else(|_| a.output.clone());
    let temp_tag = rand_tag();
    let temp = vault::temp_path(&output, temp_tag)
        .with_context(|| format!("{} has no file name", a.output.display()))?;
    let options = ExportOptions {
        threads,
        cancel: Some(&INTERRUPTED),
        temp_tag: Some(temp_tag),
        ..ExportOptions::default()
    };

    // What earlier exports killed before their rename left.
    for f in handset::exports::sweep(&dir)? {
        eprintln!(
            "pocketvisor: removed {} (left by a killed export)",
            f.display()
        );
    }
    let db = Db::open(&dir.db())?;
    let name = a.profile.as_str();
    let mut row = read_row(&db, name, &dir)?;
    // A locked profile stays here, locked: a copy elsewhere would carry no lock.
    handset::lock::check_unlocked(&dir, name, "an export")?;
    catch_interrupts();
    // The key first: the guest is not paused while argon2id runs.
    let mut reporter = Reporter::new(a.json, &format!("exporting {name}"));
    reporter.update(Progress {
        phase: Phase::DerivingKey,
        bytes_done: 0,
        bytes_total: 0,
    });
    let sealed = match vault::seal_keys(&keys, &options) {
        Ok(s) => s,
        Err(e) => {
            reporter.abandon();
            return Err(e).context(format!("cannot export {name:?}"));
        }
    };
    reporter.key_derived();
    if interrupted() {
        reporter.abandon();
        eprintln!("pocketvisor: interrupted; profile {name:?} is as it was, nothing was written");
        return Ok(EXIT_INTERRUPTED);
    }
    let mut suspended_here = false;
    if matches!(
        ProfileState::parse(&row.state),
        ProfileState::Running | ProfileState::Paused
    ) {
        lifecycle(&dir, name, "suspend", a.json)?;
        row = read_row(&db, name, &dir)?;
        suspended_here = true;
        handset::fault::kill_point("export-suspended");
    }
    let moved = !(a.keep || a.resume);
    if moved {
        // Pending until the file is complete under its name (handset::moved): a kill before
        // that leaves the profile unmoved, one after it leaves it moved.
        handset::moved::begin(&dir, name, &output).context("cannot mark the profile as moving")?;
        handset::fault::kill_point("export-marked");
    }
    // Recorded before the temporary file exists, removed when the export ends: a kill in
    // between leaves the record, and the next daemon start or export removes the file.
    let intent = handset::exports::ExportIntent::begin(&dir, &temp)
        .context("cannot record the export's temporary file")?;
    let exported = write_file(&a, &db, &dir, &row, sealed, &options, reporter);
    drop(intent);
    if moved && exported.is_err() {
        if let Err(e) = handset::moved::remove(&dir, name) {
            eprintln!("pocketvisor: warning: cannot remove the moving mark of {name:?}: {e}");
        }
    }
    let stopped = matches!(&exported, Err(e) if e.downcast_ref::<VaultError>().is_some_and(|v| matches!(v, VaultError::Interrupted)))
        || (exported.is_err() && interrupted());
    let resumed = (a.resume || stopped) && suspended_here;
    if resumed {
        let r = lifecycle(&dir, name, "resume", a.json);
        if exported.is_ok() {
            r.context("the file was written, but the profile cannot be resumed")?;
        } else if let Err(e) = r {
            eprintln!("pocketvisor: warning: cannot resume {name:?} again: {e:#}");
        }
    }
    if stopped {
        eprintln!("pocketvisor: interrupted; profile {name:?} is as it was, nothing was written");
        return Ok(EXIT_INTERRUPTED);
    }
    let mut w = exported?;
    handset::fault::kill_point("export-written");
    if moved {
        handset::moved::commit(&dir, name, &output)
            .context("the file was written, but the profile cannot be marked as moved")?;
        handset::fault::kill_point("export-committed");
    }
    if let Some(map) = w.fields.as_object_mut() {
        map.insert("resumed".into(), resumed.into());
        map.insert("moved".into(), moved.into());
    }
    w.reporter.done(w.fields);
    if !a.json {
        println!("{}", w.summary);
        if moved {
            println!(
                "{name} is marked as moved to {}: it does not start here again unless \
                 `pocketvisor profile start {name} --reclaim` (use --keep to export a copy)",
                a.output.display()
            );
        }
    }
    Ok(0)
}

/// A written file, not yet reported.
struct Written {
    reporter: Reporter,
    /// The `done` event's fields.
    fields: serde_json::Value,
    /// The line printed without `--json`.
    summary: String,
}

/// Writes the file for `row`'s profile, which is stopped or suspended.
fn write_file(
    a: &ExportArgs,
    db: &Db,
    dir: &StateDir,
    row: &ProfileRow,
    sealed: SealedKeys,
    options: &ExportOptions,
    mut reporter: Reporter,
) -> Result<Written> {
    let name = a.profile.as_str();
    let state = match ProfileState::parse(&row.state) {
        ProfileState::Suspended => SavedState::Suspended,
        ProfileState::Stopped | ProfileState::Failed => SavedState::Stopped,
        ProfileState::Offloaded => bail!(
            "profile {name:?} is offloaded: it runs at its cloud host; bring it back with \
             `pocketvisor profile return {name}` first"
        ),
        s => bail!(
            "profile {name:?} is {}: suspend or stop the profile first",
            s.as_str()
        ),
    };
    let before = fingerprint(row);

    let spec_path = dir.spec(name);
    let spec_text = std::fs::read_to_string(&spec_path)
        .with_context(|| format!("cannot read {}", spec_path.display()))?;
    let spec =
        ProfileSpec::from_toml(&spec_text).with_context(|| format!("{}", spec_path.display()))?;
    // A governed profile's signed policy travels with it (re-verified by the importer).
    let governed = dir.policy(name).is_file();
    let entries = layout::entries(dir, name, &spec, governed, state == SavedState::Suspended)?;
    let config = ProfileConfig {
        format: if governed {
            GOVERNED_FORMAT
        } else {
            CONFIG_FORMAT
        }
        .into(),
        state,
        vsock_cid: row.vsock_cid,
        exported_by: format!("pocketvisor {}", env!("CARGO_PKG_VERSION")),
        spec: spec.clone(),
        // Opened with this handset's device key; inside the file it is sealed with the rest
        // of the manifest, and the importer wraps it under its own.
        data_key: spec
            .encrypt_at_rest
            .then(|| handset::disk_keys::load_profile_key(dir, name))
            .transpose()
            .with_context(|| format!("cannot export {name:?}"))?
            .map(layout::TravellingKey),
    };
    let manifest = Manifest::new(
        name,
        serde_json::to_value(&config)?,
        Some(serde_json::to_value(&spec.channels)?),
    );

    let result = vault::export_sealed(&a.output, manifest, &entries, sealed, options, &mut |p| {
        reporter.update(p)
    });
    reporter.finished();
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            reporter.abandon();
            return Err(e).context(format!("cannot export {name:?}"));
        }
    };
    // Nothing may have started (or resumed) the profile while its files were read.
    let after = read_row(db, name, dir).map(|r| fingerprint(&r));
    if after.as_ref().ok() != Some(&before) {
        let _ = std::fs::remove_file(&a.output);
        reporter.abandon();
        bail!("profile {name:?} changed state during the export; nothing was written");
    }
    let secs = reporter.elapsed();
    let out = a.output.display().to_string();
    let summary = format!(
        "exported {name} ({}, {} files, {} of data) to {out}: {} in {:.2} s ({:.0} MB/s; key \
         derivation {:.2} s)",
        state.as_str(),
        stats.entries,
        progress::mib(stats.bytes_stored),
        progress::mib(stats.file_size),
        secs.as_secs_f64(),
        progress::rate(stats.bytes_stored, secs),
        reporter.key_seconds().unwrap_or(0.0)
    );
    let fields = serde_json::json!({
        "profile": name,
        "state": state.as_str(),
        "file": out,
        "file_size": stats.file_size,
        "entries": stats.entries,
    });
    Ok(Written {
        reporter,
        fields,
        summary,
    })
}
