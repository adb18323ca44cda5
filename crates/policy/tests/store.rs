//! Applying policies to a profile: only a newer, unexpired policy for that profile, signed by
//! the trusted key, replaces the one in force; every refusal leaves the file as it was.

use std::path::{Path, PathBuf};

use policy::{apply, read_in_force, sign, OrgSecretKey, PolicyError};

const NOW: u64 = 1_764_850_000;

fn doc(version: u64, extra: &str) -> Vec<u8> {
    format!(
        "version = {version}\nissued_at = {}\nprofile = \"work\"\n{extra}",
        NOW - 60
    )
    .into_bytes()
}

struct Fixture {
    _dir: tempfile::TempDir,
    file: PathBuf,
    key: OrgSecretKey,
}

fn fixture_with_v2_in_force() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.pvpol");
    let key = OrgSecretKey::generate();
    let env = sign(&doc(2, "[screen]\ncapture = false\n"), &key).unwrap();
    let applied = apply(&file, "work", &key.public(), &env, NOW).unwrap();
    assert!(applied.changed && applied.replaced.is_none());
    Fixture {
        _dir: dir,
        file,
        key,
    }
}

fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    files.sort();
    files
}

/// Applies `envelope` and checks it was refused with an error containing `needle` and that
/// the profile's directory is byte for byte as before, with version 2 still in force.
fn assert_refused(f: &Fixture, envelope: &[u8], needle: &str) {
    let dir = f.file.parent().unwrap();
    let before = snapshot(dir);
    let err = apply(&f.file, "work", &f.key.public(), envelope, NOW).unwrap_err();
    assert!(
        err.to_string().contains(needle),
        "expected {needle:?} in: {err}"
    );
    assert_eq!(snapshot(dir), before, "a refused policy changed files");
    let in_force = read_in_force(&f.file, "work", &f.key.public())
        .unwrap()
        .unwrap();
    assert_eq!(in_force.policy.version, 2);
    assert!(!in_force.policy.screen.capture);
}

#[test]
fn a_newer_signed_policy_replaces_the_one_in_force() {
    let f = fixture_with_v2_in_force();
    let env = sign(&doc(3, ""), &f.key).unwrap();
    let applied = apply(&f.file, "work", &f.key.public(), &env, NOW).unwrap();
    assert_eq!(applied.replaced, Some(2));
    let in_force = read_in_force(&f.file, "work", &f.key.public())
        .unwrap()
        .unwrap();
    assert_eq!(in_force.policy.version, 3);
    assert!(in_force.policy.screen.capture);
    assert_eq!(std::fs::read(&f.file).unwrap(), env);
    // The same envelope again changes nothing and is not an error.
    let again = apply(&f.file, "work", &f.key.public(), &env, NOW).unwrap();
    assert!(!again.changed);
}

#[test]
fn an_unsigned_policy_is_refused() {
    let f = fixture_with_v2_in_force();
    assert_refused(&f, &doc(3, ""), "not a signed policy");
}

#[test]
fn a_tampered_policy_is_refused() {
    let f = fixture_with_v2_in_force();
    let env = sign(&doc(3, "[screen]\ncapture = false\n"), &f.key).unwrap();
    let text = String::from_utf8(env).unwrap();
    let tampered = text.replace("capture = false", "capture = true ");
    assert_refused(&f, tampered.as_bytes(), "does not verify");
}

#[test]
fn a_policy_signed_by_another_key_is_refused() {
    let f = fixture_with_v2_in_force();
    let env = sign(&doc(3, ""), &OrgSecretKey::generate()).unwrap();
    assert_refused(&f, &env, "does not verify");
}

#[test]
fn an_expired_policy_is_refused() {
    let f = fixture_with_v2_in_force();
    let env = sign(&doc(3, &format!("expires_at = {NOW}\n")), &f.key).unwrap();
    assert_refused(&f, &env, "expired");
}

#[test]
fn an_older_or_equal_version_is_refused_as_a_rollback() {
    let f = fixture_with_v2_in_force();
    for v in [1, 2] {
        let env = sign(&doc(v, ""), &f.key).unwrap();
        assert_refused(&f, &env, "no rollback");
    }
    let err = apply(
        &f.file,
        "work",
        &f.key.public(),
        &sign(&doc(1, ""), &f.key).unwrap(),
        NOW,
    )
    .unwrap_err();
    assert!(matches!(
        err,
        PolicyError::Rollback {
            offered: 1,
            in_force: 2
        }
    ));
}

#[test]
fn a_policy_for_another_profile_is_refused() {
    let f = fixture_with_v2_in_force();
    let other = String::from_utf8(doc(3, ""))
        .unwrap()
        .replace("\"work\"", "\"personal\"");
    let env = sign(other.as_bytes(), &f.key).unwrap();
    assert_refused(&f, &env, "for profile \"personal\"");
}

#[test]
fn a_policy_file_changed_on_disk_is_not_trusted() {
    let f = fixture_with_v2_in_force();
    let text = std::fs::read_to_string(&f.file).unwrap();
    std::fs::write(&f.file, text.replace("capture = false", "capture = true ")).unwrap();
    let err = read_in_force(&f.file, "work", &f.key.public()).unwrap_err();
    assert!(err.to_string().contains("fails verification"), "{err}");
    // And a newer policy cannot be applied over it until the administrator repairs it.
    let env = sign(&doc(3, ""), &f.key).unwrap();
    assert!(apply(&f.file, "work", &f.key.public(), &env, NOW).is_err());
}

#[test]
fn write_atomic_takes_a_bare_file_name_in_the_current_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = std::env::current_dir().unwrap();
    std::env::set_current_dir(dir.path()).unwrap();
    let result = policy::store::write_atomic(Path::new("bare.pvpol"), b"x");
    std::env::set_current_dir(cwd).unwrap();
    result.unwrap();
    assert_eq!(std::fs::read(dir.path().join("bare.pvpol")).unwrap(), b"x");
}
