//! Export then import: contents, sparseness, keys, atomicity.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::*;
use vault::{EntryKind, EntrySource, KeyInfo, Progress, Unlock, VaultError};

fn assert_same_files(entries: &[EntrySource], dest: &std::path::Path) {
    for entry in entries {
        let original = fs::read(&entry.path).unwrap();
        let imported = fs::read(dest.join(&entry.name)).unwrap();
        assert_eq!(original.len(), imported.len(), "{}", entry.name);
        assert!(original == imported, "{} differs", entry.name);
    }
}

#[test]
fn sparse_round_trip_with_passphrase() {
    let dir = tempfile::tempdir().unwrap();
    let entries = big_profile(dir.path());
    let disk_meta = fs::metadata(&entries[0].path).unwrap();
    let out = dir.path().join("work.pvp");

    let mut export_events: Vec<Progress> = Vec::new();
    let stats = vault::export(
        &out,
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE)],
        &mut |p| export_events.push(p),
    )
    .unwrap();
    assert_eq!(stats.entries, 3);
    // Only the data extents are stored: far less than the 64 MiB disk.
    assert!(
        stats.bytes_stored < 2 * MIB,
        "stored {}",
        stats.bytes_stored
    );
    assert!(stats.file_size < 2 * MIB, "file {}", stats.file_size);
    assert_eq!(stats.file_size, fs::metadata(&out).unwrap().len());
    let last = export_events.last().unwrap();
    assert_eq!(last.bytes_done, last.bytes_total);
    assert_eq!(last.bytes_done, stats.bytes_stored);
    assert!(export_events
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));

    // Export never modifies its sources.
    let after = fs::metadata(&entries[0].path).unwrap();
    assert_eq!(disk_meta.mtime(), after.mtime());
    assert_eq!(disk_meta.mtime_nsec(), after.mtime_nsec());

    let dest = dir.path().join("imported");
    let mut import_events: Vec<Progress> = Vec::new();
    let got = vault::import(&out, &pass_unlock(PASSPHRASE), &dest, &mut |p| {
        import_events.push(p)
    })
    .unwrap();
    assert_same_files(&entries, &dest);
    let last = import_events.last().unwrap();
    assert_eq!(last.bytes_done, stats.file_size);
    assert_eq!(last.bytes_total, stats.file_size);

    // Holes stay holes.
    let imported_disk = dest.join("disk.raw");
    assert_eq!(fs::metadata(&imported_disk).unwrap().len(), 64 * MIB);
    if allocated(&entries[0].path) < 4 * MIB {
        assert!(
            allocated(&imported_disk) < 4 * MIB,
            "imported disk allocates {} bytes",
            allocated(&imported_disk)
        );
    }

    assert_eq!(got.name, "work");
    assert_eq!(got.config, manifest().config);
    assert_eq!(got.policy, manifest().policy);
    assert_eq!(got.keys, vec![KeyInfo::Passphrase]);
    let kinds: Vec<_> = got
        .entries
        .iter()
        .map(|e| (e.name.as_str(), e.kind))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("disk.raw", EntryKind::Disk),
            ("snapshot/state", EntryKind::SnapshotState),
            ("snapshot/memory", EntryKind::SnapshotMemory),
        ]
    );
    assert_eq!(got.entries[0].length, 64 * MIB);

    // inspect and verify agree with import.
    assert_eq!(vault::inspect(&out, &pass_unlock(PASSPHRASE)).unwrap(), got);
    assert_eq!(
        vault::verify(&out, &pass_unlock(PASSPHRASE), &mut |_| {}).unwrap(),
        got
    );
    assert_no_leftovers(dir.path());
}

#[test]
fn recipient_and_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let entries = small_profile(dir.path());
    let (secret, public) = vault::generate_identity();
    let (other_secret, _) = vault::generate_identity();

    // Recipient only.
    let only_recipient = dir.path().join("r.pvp");
    vault::export_with(
        &only_recipient,
        manifest(),
        &entries,
        &[vault::KeySpec::Recipient(public)],
        &SMALL_CHUNKS,
        &mut |_| {},
    )
    .unwrap();
    let dest = dir.path().join("r");
    let m = vault::import(
        &only_recipient,
        &Unlock::Identity(secret.clone()),
        &dest,
        &mut |_| {},
    )
    .unwrap();
    assert_same_files(&entries, &dest);
    assert_eq!(
        m.keys,
        vec![KeyInfo::Recipient {
            public_key: vault::encode_public(&public)
        }]
    );
    // A passphrase cannot open a recipient-only file, nor can another identity.
    for unlock in [pass_unlock(PASSPHRASE), Unlock::Identity(other_secret)] {
        let err = vault::import(&only_recipient, &unlock, &dir.path().join("x"), &mut |_| {})
            .unwrap_err();
        assert!(matches!(err, VaultError::WrongKey), "{err}");
        assert!(!dir.path().join("x").exists());
    }

    // Both: either key opens it.
    let both = dir.path().join("both.pvp");
    vault::export_with(
        &both,
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE), vault::KeySpec::Recipient(public)],
        &SMALL_CHUNKS,
        &mut |_| {},
    )
    .unwrap();
    for (i, unlock) in [pass_unlock(PASSPHRASE), Unlock::Identity(secret)]
        .into_iter()
        .enumerate()
    {
        let dest = dir.path().join(format!("both-{i}"));
        let m = vault::import(&both, &unlock, &dest, &mut |_| {}).unwrap();
        assert_same_files(&entries, &dest);
        assert_eq!(m.keys.len(), 2);
    }
    assert_no_leftovers(dir.path());
}

#[test]
fn wrong_key_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let err = import_bytes(dir.path(), &bytes, &pass_unlock("not it")).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey), "{err}");
    assert_eq!(
        err.to_string(),
        "wrong passphrase or key: no key slot opens this file"
    );
    let (stranger, _) = vault::generate_identity();
    let err = import_bytes(dir.path(), &bytes, &Unlock::Identity(stranger)).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey), "{err}");
    // inspect says the same.
    let err = vault::inspect(&dir.path().join("a.pvp"), &pass_unlock("nope")).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey), "{err}");
}

#[test]
fn existing_destination_is_refused_and_untouched() {
    let dir = tempfile::tempdir().unwrap();
    small_file(dir.path(), "a.pvp");
    let input = dir.path().join("a.pvp");

    // An existing empty directory (which a plain rename would replace).
    let dest = dir.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = vault::import(&input, &pass_unlock(PASSPHRASE), &dest, &mut |_| {}).unwrap_err();
    assert!(matches!(err, VaultError::DestinationExists { .. }), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);

    // An existing file.
    let dest_file = dir.path().join("file");
    fs::write(&dest_file, b"keep me").unwrap();
    let err = vault::import(&input, &pass_unlock(PASSPHRASE), &dest_file, &mut |_| {}).unwrap_err();
    assert!(matches!(err, VaultError::DestinationExists { .. }), "{err}");
    assert_eq!(fs::read(&dest_file).unwrap(), b"keep me");

    // The destination appearing while the import runs (after the initial check).
    let racing = dir.path().join("racing");
    let mut created = false;
    let err = vault::import(&input, &pass_unlock(PASSPHRASE), &racing, &mut |_| {
        if !created {
            fs::create_dir(&racing).unwrap();
            created = true;
        }
    })
    .unwrap_err();
    assert!(matches!(err, VaultError::DestinationExists { .. }), "{err}");
    assert_eq!(fs::read_dir(&racing).unwrap().count(), 0);
    assert_no_leftovers(dir.path());
}

#[test]
fn nothing_under_final_names_until_done() {
    let dir = tempfile::tempdir().unwrap();
    let entries = big_profile(dir.path());
    let out = dir.path().join("work.pvp");
    let mut calls = 0;
    vault::export(
        &out,
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE)],
        &mut |_| {
            // What a kill -9 at this point would leave behind: no final file.
            assert!(!out.exists());
            calls += 1;
        },
    )
    .unwrap();
    assert!(calls > 1);
    let dest = dir.path().join("imported");
    vault::import(&out, &pass_unlock(PASSPHRASE), &dest, &mut |_| {
        assert!(!dest.exists());
    })
    .unwrap();
    assert!(dest.join("disk.raw").exists());
}

#[test]
fn failed_export_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let entries = small_profile(dir.path());

    // A missing source.
    let out = dir.path().join("out.pvp");
    let mut missing = entries.clone();
    missing.push(EntrySource {
        name: "gone".into(),
        kind: EntryKind::Other,
        path: dir.path().join("does-not-exist"),
    });
    let err = vault::export(&out, manifest(), &missing, &[pass_key("p")], &mut |_| {}).unwrap_err();
    assert!(matches!(err, VaultError::Io { .. }), "{err}");
    assert!(!out.exists());

    // A directory as a source, a bad name, no keys.
    let mut dir_source = entries.clone();
    dir_source[0].path = dir.path().to_path_buf();
    let mut bad_name = entries.clone();
    bad_name[0].name = "../escape".into();
    for (e, keys) in [
        (&dir_source, vec![pass_key("p")]),
        (&bad_name, vec![pass_key("p")]),
        (&entries, vec![]),
    ] {
        let err = vault::export(&out, manifest(), e, &keys, &mut |_| {}).unwrap_err();
        assert!(matches!(err, VaultError::InvalidInput { .. }), "{err}");
        assert!(!out.exists());
    }

    // A source that shrinks while being exported fails mid-way.
    let big_dir = dir.path().join("big");
    fs::create_dir(&big_dir).unwrap();
    let big = big_profile(&big_dir);
    let err = vault::export_with(
        &out,
        manifest(),
        &big,
        &[pass_key("p")],
        &SMALL_CHUNKS,
        &mut |p| {
            if p.bytes_done > 0 {
                fs::File::options()
                    .write(true)
                    .open(&big[2].path)
                    .unwrap()
                    .set_len(10)
                    .unwrap();
            }
        },
    )
    .unwrap_err();
    assert!(matches!(err, VaultError::Io { .. }), "{err}");
    assert!(!out.exists());
    assert_no_leftovers(dir.path());
}

#[test]
fn output_directory_vanishing_mid_export_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let entries = big_profile(dir.path());
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("work.pvp");
    let mut removed = false;
    let err = vault::export(&out, manifest(), &entries, &[pass_key("p")], &mut |p| {
        if !removed && p.bytes_done > 0 {
            fs::remove_dir_all(&out_dir).unwrap();
            fs::create_dir(&out_dir).unwrap();
            removed = true;
        }
    })
    .unwrap_err();
    assert!(matches!(err, VaultError::Io { .. }), "{err}");
    assert!(!out.exists());
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 0);
}

#[test]
fn failed_export_keeps_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let entries = small_profile(dir.path());
    let out = dir.path().join("work.pvp");
    vault::export(&out, manifest(), &entries, &[pass_key("p")], &mut |_| {}).unwrap();
    let before = fs::read(&out).unwrap();
    let mut broken = entries.clone();
    broken[1].path = dir.path().join("missing");
    vault::export(&out, manifest(), &broken, &[pass_key("p")], &mut |_| {}).unwrap_err();
    assert_eq!(fs::read(&out).unwrap(), before);
    // A successful export replaces it.
    vault::export(
        &out,
        manifest(),
        &entries[..1],
        &[pass_key("p")],
        &mut |_| {},
    )
    .unwrap();
    let m = vault::inspect(&out, &pass_unlock("p")).unwrap();
    assert_eq!(m.entries.len(), 1);
}

#[test]
fn empty_and_zero_length_entries() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    fs::write(&empty, b"").unwrap();
    let out = dir.path().join("e.pvp");
    let entries = [EntrySource {
        name: "empty".into(),
        kind: EntryKind::Other,
        path: empty,
    }];
    vault::export(&out, manifest(), &entries, &[pass_key("p")], &mut |_| {}).unwrap();
    let dest = dir.path().join("d");
    let m = vault::import(&out, &pass_unlock("p"), &dest, &mut |_| {}).unwrap();
    assert_eq!(m.entries[0].length, 0);
    assert_eq!(fs::read(dest.join("empty")).unwrap(), b"");

    let none = dir.path().join("none.pvp");
    vault::export(&none, manifest(), &[], &[pass_key("p")], &mut |_| {}).unwrap();
    let dest = dir.path().join("d2");
    let m = vault::import(&none, &pass_unlock("p"), &dest, &mut |_| {}).unwrap();
    assert!(m.entries.is_empty());
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
}

#[test]
#[ignore = "argon2 at its real cost takes seconds in debug builds; run with --ignored"]
fn default_kdf_params_round_trip() {
    // The real argon2 parameters work end to end.
    let dir = tempfile::tempdir().unwrap();
    let entries = small_profile(dir.path());
    let out = dir.path().join("real.pvp");
    vault::export(
        &out,
        manifest(),
        &entries,
        &[vault::KeySpec::passphrase("pw")],
        &mut |_| {},
    )
    .unwrap();
    vault::inspect(&out, &pass_unlock("pw")).unwrap();
}

#[test]
fn keys_sealed_beforehand_open_the_file_and_a_cancelled_export_writes_nothing() {
    use std::sync::atomic::AtomicBool;
    let dir = tempfile::tempdir().unwrap();
    let entries = small_profile(dir.path());
    let out = dir.path().join("sealed.pvp");
    // The keys are derived first (as export does before pausing a guest), the data later.
    let sealed = vault::seal_keys(&[pass_key(PASSPHRASE)], &SMALL_CHUNKS).unwrap();
    let mut phases = vec![];
    vault::export_sealed(
        &out,
        manifest(),
        &entries,
        sealed,
        &SMALL_CHUNKS,
        &mut |p| phases.push(p.phase),
    )
    .unwrap();
    assert!(!phases.contains(&vault::Phase::DerivingKey), "{phases:?}");
    import_bytes(
        dir.path(),
        &fs::read(&out).unwrap(),
        &pass_unlock(PASSPHRASE),
    )
    .unwrap();

    static STOP: AtomicBool = AtomicBool::new(true);
    let cancelled = dir.path().join("cancelled.pvp");
    let options = vault::ExportOptions {
        cancel: Some(&STOP),
        ..SMALL_CHUNKS
    };
    let err = vault::export_with(
        &cancelled,
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE)],
        &options,
        &mut |_| {},
    )
    .unwrap_err();
    assert!(matches!(err, VaultError::Interrupted), "{err}");
    assert!(!cancelled.exists());
    let debris: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(debris.is_empty(), "{debris:?}");
}
