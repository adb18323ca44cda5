//! `pocketvisor export`: a handset profile into one encrypted `.pvp` file.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use handset::client::{Client, ClientError};
use handset::db::{Db, ProfileRow};
use handset::{ProfileInfo, ProfileSpec, ProfileState, StateDir};
use vault::{ExportOptions, KeySpec, Manifest};

use super::layout::{self, ProfileConfig, SavedState, CONFIG_FORMAT};
use super::progress::{self, Reporter};
use super::secret::{self, PassphraseArgs};

/// Write a profile (spec, disks, snapshot) to one encrypted portable file.
#[derive(Args, Debug)]
#[command(after_help = "\
A running (or paused) profile is first suspended through the handset daemon, which must then
be running; it stays suspended afterwards unless --resume is given. A stopped profile is
exported without a snapshot and boots afresh after import. The profile's files are only
read. The file is written under a temporary name and renamed when complete, so an
interrupted export never leaves a partial file under the final name.

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
    json: bool,
    /// If this export suspends a running profile, resume it afterwards (the file is then a
    /// copy of that moment, e.g. a backup; by default the profile stays suspended).
    #[arg(long)]
    resume: bool,
}

/// The parts of a row that change when the profile's files may change.
fn fingerprint(row: &ProfileRow) -> (String, Option<i64>, Option<i32>) {
    (row.state.clone(), row.started_ms, row.pid)
}

fn read_row(db: &Db, name: &str, dir: &StateDir) -> Result<ProfileRow> {
    db.profile(name)?
        .with_context(|| format!("no profile {name:?} in {}", dir.root().display()))
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
            "profile {name:?} is running but its handset daemon does not answer: \
             suspend or stop the profile first"
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
        a.passphrase.given()?
    };
    if let Some(p) = passphrase {
        keys.push(KeySpec::Passphrase {
            passphrase: p,
            params: secret::kdf_params()?,
        });
    }
    keys.extend(recipients.into_iter().map(KeySpec::Recipient));
    let threads = secret::threads()?;

    let db = Db::open(&dir.db())?;
    let name = a.profile.as_str();
    let mut row = read_row(&db, name, &dir)?;
    let mut suspended_here = false;
    if matches!(
        ProfileState::parse(&row.state),
        ProfileState::Running | ProfileState::Paused
    ) {
        lifecycle(&dir, name, "suspend", a.json)?;
        row = read_row(&db, name, &dir)?;
        suspended_here = true;
    }
    let exported = write_file(&a, &db, &dir, &row, &keys, threads);
    let resumed = a.resume && suspended_here;
    if resumed {
        let r = lifecycle(&dir, name, "resume", a.json);
        if exported.is_ok() {
            r.context("the file was written, but the profile cannot be resumed")?;
        }
    }
    let mut w = exported?;
    if let Some(map) = w.fields.as_object_mut() {
        map.insert("resumed".into(), resumed.into());
    }
    w.reporter.done(w.fields);
    if !a.json {
        outln!("{}", w.summary);
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
    keys: &[KeySpec],
    threads: usize,
) -> Result<Written> {
    let name = a.profile.as_str();
    let state = match ProfileState::parse(&row.state) {
        ProfileState::Suspended => SavedState::Suspended,
        ProfileState::Stopped | ProfileState::Failed => SavedState::Stopped,
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
    let entries = layout::entries(dir, name, &spec, state == SavedState::Suspended)?;
    let config = ProfileConfig {
        format: CONFIG_FORMAT.into(),
        state,
        vsock_cid: row.vsock_cid,
        exported_by: format!("pocketvisor {}", env!("CARGO_PKG_VERSION")),
        spec: spec.clone(),
    };
    let manifest = Manifest::new(
        name,
        serde_json::to_value(&config)?,
        Some(serde_json::to_value(&spec.channels)?),
    );

    let mut reporter = Reporter::new(a.json, &format!("exporting {name}"));
    let result = vault::export_with(
        &a.output,
        manifest,
        &entries,
        keys,
        &ExportOptions {
            threads,
            ..ExportOptions::default()
        },
        &mut |p| reporter.update(p),
    );
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
