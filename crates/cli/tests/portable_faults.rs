//! Bad input and faults: a wrong key, flipped bytes, truncation, a foreign or future file, a
//! name clash, and kill -9 during export and import. Each leaves the importing side exactly
//! as it was (one clear error line), and export never modifies its source.
//!
//! No VM runs here (the profiles are stopped), so these tests need no /dev/kvm.

mod common;
mod portable_common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use portable_common::*;

const FAST_KDF: (&str, &str) = ("POCKETVISOR_KDF", "fast");

fn export(dir: &Path, name: &str, out: &Path, pass: &Path) {
    let o = run(
        &[
            "export",
            name,
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            dir.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        &[FAST_KDF],
    );
    assert_ok(&o, "export");
}

fn import(file: &Path, dir: &Path, pass: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "import",
        file.to_str().unwrap(),
        "--state-dir",
        dir.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run(&args, &[])
}

/// A copy of `file` changed by `edit`.
fn damaged(s: &Scratch, file: &Path, tag: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(file).unwrap();
    edit(&mut bytes);
    let p = s.path(&format!("{tag}.pvp"));
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn bad_files_change_nothing() {
    let s = Scratch::new(SCRATCH, "bad");
    let (dir_a, dir_b) = (s.path("a"), s.path("b"));
    let pass = passphrase_file(&s, "pass", PASSPHRASE);
    let wrong_pass = passphrase_file(&s, "wrong", "correct horse battery stapler");
    let a = Daemon::start(&dir_a, None);
    a.profile(&["create", "work", "--template", "work"]);
    let disk_a = dir_a.join("profiles/work/disks/data.img");
    scribble(&disk_a, 99);
    let before = std::fs::metadata(&disk_a).unwrap();
    let disk_bytes = std::fs::read(&disk_a).unwrap();

    let good = s.path("work.pvp");
    export(&dir_a, "work", &good, &pass);
    // The source is only read.
    let after = std::fs::metadata(&disk_a).unwrap();
    assert_eq!(
        (before.mtime(), before.mtime_nsec()),
        (after.mtime(), after.mtime_nsec())
    );
    assert!(std::fs::read(&disk_a).unwrap() == disk_bytes);
    assert_eq!(rows(&dir_a), [("work".to_string(), "stopped".to_string())]);

    // A profile the registry says runs, with no daemon to suspend it, is refused.
    let mut a = a;
    a.stop();
    handset::db::Db::open(&dir_a.join("handset.db"))
        .unwrap()
        .set_state("work", "running", Some(1), "")
        .unwrap();
    let refused = run(
        &[
            "export",
            "work",
            "-o",
            s.path("refused.pvp").to_str().unwrap(),
            "--state-dir",
            dir_a.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_error(
        &refused,
        "does not answer: start it (`pocketvisor handset --state-dir",
    );
    assert!(!s.path("refused.pvp").exists());

    // B already holds a profile; every failure below must leave it exactly so.
    assert_ok(&import(&good, &dir_b, &pass, &["--name", "keep"]), "import");
    let tree_b = tree(&dir_b);
    let rows_b = rows(&dir_b);
    assert_eq!(rows_b, [("keep".to_string(), "stopped".to_string())]);
    assert!(tree_b.contains_key("profiles/keep/disks/data.img"));

    let len = usize::try_from(std::fs::metadata(&good).unwrap().len()).unwrap();
    assert!(len > 200_000, "the test file is too small ({len} bytes)");
    let cases: Vec<(PathBuf, &Path, &str)> = vec![
        (good.clone(), &wrong_pass, "wrong passphrase or key"),
        (
            damaged(&s, &good, "salt", |b| b[20] ^= 0x01),
            &pass,
            "", // a damaged header fails the key slot or its MAC
        ),
        (
            damaged(&s, &good, "middle", |b| b[len / 2] ^= 0x40),
            &pass,
            "corrupt",
        ),
        (
            damaged(&s, &good, "last", |b| b[len - 1] ^= 0x80),
            &pass,
            "corrupt",
        ),
        (
            damaged(&s, &good, "truncated", |b| b.truncate(len - 1000)),
            &pass,
            "truncated",
        ),
        (
            damaged(&s, &good, "trailing", |b| b.extend_from_slice(b"junk")),
            &pass,
            "after its last chunk",
        ),
        (
            damaged(&s, &good, "future", |b| b[8] = 2),
            &pass,
            "unsupported portable profile format version 2",
        ),
        (
            damaged(&s, &good, "foreign", |b| {
                b[..8].copy_from_slice(b"NOTAPVP!")
            }),
            &pass,
            "not a pocketvisor portable profile",
        ),
        (
            // Renamed onto the existing profile.
            good.clone(),
            &pass,
            "already exists",
        ),
    ];
    for (i, (file, key, needle)) in cases.iter().enumerate() {
        let extra: &[&str] = if i == cases.len() - 1 {
            &["--name", "keep"]
        } else {
            &[]
        };
        let audited = refusals(&dir_b).len();
        let out = import(file, &dir_b, key, extra);
        assert_one_error(&out, needle);
        assert_eq!(rows(&dir_b), rows_b, "case {}", file.display());
        assert!(tree(&dir_b) == tree_b, "case {} changed B", file.display());
        assert_refusal_audited(&dir_b, audited, file);
    }
    // A well-formed file with something that is not part of a profile (anyone can make one
    // for a recipient key) is refused.
    let unlock = vault::Unlock::Passphrase(vault::Passphrase::new(PASSPHRASE));
    let manifest = vault::inspect(&good, &unlock).unwrap();
    let evil = s.path("evil");
    std::fs::write(&evil, b"#!/bin/sh\n").unwrap();
    let entry = |name: &str, path: PathBuf| vault::EntrySource {
        name: name.into(),
        kind: vault::EntryKind::Other,
        path,
    };
    let crafted = s.path("crafted.pvp");
    vault::export(
        &crafted,
        vault::Manifest::new("work", manifest.config.clone(), manifest.policy.clone()),
        &[
            entry("profile.toml", dir_a.join("profiles/work/profile.toml")),
            entry("disks/data.img", disk_a.clone()),
            entry("run/vm.toml", evil),
        ],
        &[vault::KeySpec::Passphrase {
            passphrase: vault::Passphrase::new(PASSPHRASE),
            params: vault::KdfParams::INSECURE_FAST,
        }],
        &mut |_| {},
    )
    .unwrap();
    let audited = refusals(&dir_b).len();
    assert_one_error(
        &import(&crafted, &dir_b, &pass, &["--name", "crafted"]),
        "not part of a profile",
    );
    assert!(tree(&dir_b) == tree_b);
    assert_eq!(rows(&dir_b), rows_b);
    assert_refusal_audited(&dir_b, audited, &crafted);

    // A well-formed file whose spec names a free host path as its initrd (any root-readable
    // file, another profile's disk) is refused, audited, and leaves nothing behind.
    for bad in ["/etc/passwd", "../other/disks/data.img"] {
        let mut config = manifest.config.clone();
        config["spec"]["initrd"] = serde_json::json!(bad);
        let host_path = s.path("host-path.pvp");
        let _ = std::fs::remove_file(&host_path);
        vault::export(
            &host_path,
            vault::Manifest::new("work", config, manifest.policy.clone()),
            &[
                entry("profile.toml", dir_a.join("profiles/work/profile.toml")),
                entry("disks/data.img", disk_a.clone()),
            ],
            &[vault::KeySpec::Passphrase {
                passphrase: vault::Passphrase::new(PASSPHRASE),
                params: vault::KdfParams::INSECURE_FAST,
            }],
            &mut |_| {},
        )
        .unwrap();
        let audited = refusals(&dir_b).len();
        assert_one_error(
            &import(&host_path, &dir_b, &pass, &["--name", "hostpath"]),
            "is not allowed: a guest asset is the file name of a file in the handset's asset",
        );
        assert!(tree(&dir_b) == tree_b, "{bad}: changed B");
        assert_eq!(rows(&dir_b), rows_b, "{bad}");
        let records = assert_refusal_audited(&dir_b, audited, &host_path);
        assert_eq!(records.profile, "hostpath");
        assert!(records.detail.contains(bad), "{}", records.detail);
    }

    // A bad --name is refused before anything happens.
    let audited = refusals(&dir_b).len();
    assert_one_error(
        &import(&good, &dir_b, &pass, &["--name", "Bad/Name"]),
        "profile name",
    );
    assert!(tree(&dir_b) == tree_b);
    // Audited under `-`, not under the name it asked for.
    assert_eq!(assert_refusal_audited(&dir_b, audited, &good).profile, "-");
    // A failed import into a missing state directory does not create it.
    let fresh = s.path("fresh");
    assert_one_error(
        &import(
            &damaged(&s, &good, "mid2", |b| b[len / 3] ^= 1),
            &fresh,
            &pass,
            &[],
        ),
        "corrupt",
    );
    assert!(!fresh.exists());
}

/// The `import-refused` records of a state directory's audit log.
fn refusals(dir: &Path) -> Vec<handset::db::Event> {
    handset::db::Db::open(&dir.join("handset.db"))
        .unwrap()
        .records(handset::db::Log::Audit, None, 10_000)
        .unwrap()
        .into_iter()
        .filter(|e| e.event == "import-refused")
        .collect()
}

/// Checks that exactly one `import-refused` record was added after the first `before`,
/// naming `file`; returns it.
fn assert_refusal_audited(dir: &Path, before: usize, file: &Path) -> handset::db::Event {
    let now = refusals(dir);
    assert_eq!(now.len(), before + 1, "{}: {now:?}", file.display());
    let last = now.last().unwrap().clone();
    assert!(
        last.detail.contains(&file.display().to_string()),
        "{}: {last:?}",
        file.display()
    );
    last
}

/// Fills the profile's disk with `mib` MiB of random data.
fn fill_random(disk: &Path, mib: u64) {
    let mut src = std::fs::File::open("/dev/urandom").unwrap().take(mib << 20);
    let mut dst = std::fs::OpenOptions::new().write(true).open(disk).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    dst.sync_all().unwrap();
}

/// Files in `dir` whose names start with `prefix`.
fn named(dir: &Path, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn kill_9_during_export_or_import() {
    let s = Scratch::new(SCRATCH, "kill");
    let (dir_a, dir_b) = (s.path("a"), s.path("b"));
    let pass = passphrase_file(&s, "pass", PASSPHRASE);
    let a = Daemon::start(&dir_a, None);
    a.profile(&["create", "big", "--template", "work"]);
    let disk = dir_a.join("profiles/big/disks/data.img");
    fill_random(&disk, 24);
    let out = s.path("big.pvp");
    let args = [
        "export",
        "big",
        "-o",
        out.to_str().unwrap(),
        "--state-dir",
        dir_a.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
        "--force",
    ];

    // No file yet: a killed export leaves nothing under the final name.
    assert!(kill_midway(&args, &[FAST_KDF]), "the export ended first");
    assert!(!out.exists(), "a killed export left {}", out.display());
    // An earlier export under that name survives a killed one intact.
    export(&dir_a, "big", &out, &pass);
    let complete = std::fs::read(&out).unwrap();
    assert!(kill_midway(&args, &[FAST_KDF]), "the export ended first");
    assert!(
        std::fs::read(&out).unwrap() == complete,
        "the old file changed"
    );
    // Only temporary files are left, never under the final name.
    for debris in named(&s.0, "big.pvp.tmp-") {
        std::fs::remove_file(s.path(&debris)).unwrap();
    }
    assert_eq!(rows(&dir_a), [("big".to_string(), "stopped".to_string())]);

    // A killed import leaves no profile behind.
    let import_args = [
        "import",
        out.to_str().unwrap(),
        "--state-dir",
        dir_b.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ];
    assert!(kill_midway(&import_args, &[]), "the import ended first");
    assert_eq!(rows(&dir_b), []);
    let profiles_b = dir_b.join("profiles");
    let visible: Vec<String> = named(&profiles_b, "")
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    assert!(visible.is_empty(), "a killed import left {visible:?}");
    // The next import succeeds and sweeps the killed one's staging directories.
    let o = run(&import_args, &[]);
    assert_ok(&o, "import");
    assert_eq!(rows(&dir_b), [("big".to_string(), "stopped".to_string())]);
    assert_eq!(named(&profiles_b, ""), ["big"]);
    assert!(same_file(&disk, &profiles_b.join("big/disks/data.img")));
    assert!(!profiles_b.join("big/.import-pending").exists());

    // An import killed between moving the profile into place and registering it left a
    // directory with its marker (a pid that no longer runs): the next import removes it.
    let ghost = profiles_b.join("ghost");
    std::fs::create_dir_all(ghost.join("disks")).unwrap();
    std::fs::write(ghost.join(".import-pending"), "999999999").unwrap();
    let mut again = import_args.to_vec();
    again.extend(["--name", "ghost"]);
    assert_ok(&run(&again, &[]), "import over a killed import's leftovers");
    assert_eq!(
        rows(&dir_b),
        [
            ("big".to_string(), "stopped".to_string()),
            ("ghost".to_string(), "stopped".to_string())
        ]
    );
    assert!(same_file(&disk, &ghost.join("disks/data.img")));
}
