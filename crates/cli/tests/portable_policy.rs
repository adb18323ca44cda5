//! A governed profile's signed policy travels inside its `.pvp` file and is verified again
//! by the importing handset: under its own trusted organisation key, for the profile's own
//! name, and never older than a version that handset accepted before. Every refusal leaves
//! the importing state directory without the profile. No VM is needed (stopped profiles).

mod common;
mod portable_common;

use std::path::Path;

use portable_common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Signs a policy for profile `work` at `version` with `key`; returns the signed file.
fn sign(sc: &Scratch, key: &Path, version: u64) -> std::path::PathBuf {
    let doc = sc.path(&format!("work-v{version}.toml"));
    std::fs::write(
        &doc,
        format!("version = {version}\nissued_at = 1764850000\nprofile = \"work\"\n\n[screen]\ncapture = false\n"),
    )
    .unwrap();
    let out = sc.path(&format!("work-v{version}.pvpol"));
    let signed = run(
        &["policy", "sign", "--key", s(key), s(&doc), "-o", s(&out)],
        &[],
    );
    assert_ok(&signed, "policy sign");
    out
}

fn export(dir: &Path, out: &Path, recipient: &str) {
    let e = run(
        &[
            "export",
            "work",
            "-o",
            s(out),
            "--state-dir",
            s(dir),
            "--recipient",
            recipient,
            "--keep",
            "--force",
        ],
        &[],
    );
    assert_ok(&e, "export");
}

fn import(dir: &Path, file: &Path, identity: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "import",
        s(file),
        "--state-dir",
        s(dir),
        "--identity",
        s(identity),
    ];
    args.extend_from_slice(extra);
    run(&args, &[])
}

fn trust(dir: &Path, key_pub: &Path, replace: bool) {
    let mut args = vec!["policy", "trust", s(key_pub), "--state-dir", s(dir)];
    if replace {
        args.push("--replace");
    }
    assert_ok(&run(&args, &[]), "policy trust");
}

#[test]
fn a_governed_profile_carries_its_policy_and_the_importer_verifies_it() {
    let sc = Scratch::new(SCRATCH, "policy");
    let (dir_a, dir_b) = (sc.path("a"), sc.path("b"));
    let org = sc.path("org.key");
    assert_ok(&run(&["policy", "keygen", "-o", s(&org)], &[]), "keygen");
    let org_pub = sc.path("org.key.pub");
    let rogue = sc.path("rogue.key");
    assert_ok(&run(&["policy", "keygen", "-o", s(&rogue)], &[]), "keygen");
    let id = sc.path("id.key");
    let kg = run(&["keygen", "-o", s(&id)], &[]);
    assert_ok(&kg, "keygen");
    let recipient = String::from_utf8_lossy(&kg.stdout).trim().to_string();

    // Handset A governs `work` with version 2, exports it, then moves on to version 3.
    let a = Daemon::start(&dir_a, None);
    a.profile(&["create", "work", "--template", "work"]);
    trust(&dir_a, &org_pub, false);
    let v2 = sign(&sc, &org, 2);
    assert_ok(
        &run(&["policy", "apply", s(&v2), "--state-dir", s(&dir_a)], &[]),
        "apply v2",
    );
    let old_file = sc.path("work-v2.pvp");
    export(&dir_a, &old_file, &recipient);
    let v3 = sign(&sc, &org, 3);
    assert_ok(
        &run(&["policy", "apply", s(&v3), "--state-dir", s(&dir_a)], &[]),
        "apply v3",
    );
    let new_file = sc.path("work-v3.pvp");
    export(&dir_a, &new_file, &recipient);
    let profile_b = dir_b.join("profiles/work");

    // B trusts no organisation key: refused, nothing created.
    let out = import(&dir_b, &new_file, &id, &[]);
    assert_one_error(&out, "trusts no organisation key");
    assert!(!profile_b.exists());
    // B trusts another organisation: the policy does not verify.
    let rogue_pub = sc.path("rogue.key.pub");
    trust(&dir_b, &rogue_pub, false);
    let out = import(&dir_b, &new_file, &id, &[]);
    assert_one_error(
        &out,
        "does not verify under this handset's organisation key",
    );
    assert!(!profile_b.exists());
    assert!(rows(&dir_b).is_empty());

    // B trusts the organisation: a governed profile keeps its name.
    trust(&dir_b, &org_pub, true);
    let out = import(&dir_b, &new_file, &id, &["--name", "work2"]);
    assert_one_error(&out, "keeps its name");
    assert!(!dir_b.join("profiles/work2").exists());

    // Imported under its name: version 3 is in force on B, the same signed bytes as on A.
    assert_ok(&import(&dir_b, &new_file, &id, &[]), "import");
    assert_eq!(
        std::fs::read(profile_b.join("policy.pvpol")).unwrap(),
        std::fs::read(dir_a.join("profiles/work/policy.pvpol")).unwrap()
    );
    let shown = run(
        &[
            "profile",
            "--state-dir",
            s(&dir_b),
            "policy",
            "work",
            "--json",
        ],
        &[],
    );
    assert_ok(&shown, "profile policy");
    let shown: serde_json::Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["policy"]["version"], 3, "{shown}");
    assert_eq!(shown["screen"]["capture"], false, "{shown}");

    // The profile is deleted on B; the older export would bring version 2 back: refused.
    let b = Daemon::start(&dir_b, None);
    b.profile(&["delete", "work"]);
    assert!(!profile_b.exists());
    let out = import(&dir_b, &old_file, &id, &[]);
    assert_one_error(&out, "no rollback");
    assert!(!profile_b.exists());

    // A policy changed on A's disk after it was applied travels changed and is refused.
    let stored = dir_a.join("profiles/work/policy.pvpol");
    let mut bytes = std::fs::read(&stored).unwrap();
    let at = bytes.len() - 2;
    bytes[at] ^= 0x01; // one bit of the signed body
    std::fs::write(&stored, &bytes).unwrap();
    let tampered = sc.path("work-tampered.pvp");
    export(&dir_a, &tampered, &recipient);
    let out = import(&dir_b, &tampered, &id, &[]);
    assert_one_error(&out, "does not verify");
    assert!(!profile_b.exists());

    // Refusals are in B's audit log, under the profile's name.
    let audit = b.profile(&["audit"]);
    assert!(audit.contains("import-refused"), "{audit}");
    drop(a);
}
