//! kill -9 at every step of export, import and delete: each named kill point
//! (`POCKETVISOR_KILL_AT`, see `handset::fault`) and once in the middle of the data, several
//! runs. After each kill the state directory is one the normal commands work from: the
//! profile is moved exactly when the file is complete under its name, an import is either
//! registered with all its files or leaves nothing a user sees (the next daemon or import
//! sweeps its debris), a delete is finished by the next daemon. The temporary file of an
//! export killed in its data is removed by the next daemon start or the next export.
//!
//! No VM runs (the profiles are stopped), so no /dev/kvm is needed.

mod common;
mod portable_common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Instant;

use portable_common::*;

const FAST_KDF: (&str, &str) = ("POCKETVISOR_KDF", "fast");
const KILL_AT: &str = "POCKETVISOR_KILL_AT";
/// Runs of the whole loop ($PV_KILL_RUNS, default 1).
fn runs() -> usize {
    std::env::var("PV_KILL_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// Runs `args`, killed at `point` (a named kill point, or "midway" in the data).
fn run_killed(args: &[&str], env: &[(&str, &str)], point: &str) {
    if point == "midway" {
        assert!(kill_midway(args, env), "{args:?} ended before the kill");
        return;
    }
    let mut env = env.to_vec();
    env.push((KILL_AT, point));
    let out: Output = run(args, &env);
    assert!(
        !out.status.success(),
        "{args:?} was not killed at {point}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The profile's `moved_to` as the daemon reports it.
fn moved_to(d: &Daemon, name: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&d.profile(&["--json", "show", name])).unwrap();
    let p = if v["profile"].is_object() {
        &v["profile"]
    } else {
        &v
    };
    p["moved_to"].as_str().map(String::from)
}

/// Names in `dir` (sorted).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|l| {
            l.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Checks that `dir`'s registry and `profiles/` agree: every row has its files (spec and
/// the disk equal to `disk`), every directory has its row, and nothing else is left.
fn consistent(dir: &Path, disk: &Path) -> Vec<String> {
    let rows: Vec<String> = rows(dir).into_iter().map(|(n, _)| n).collect();
    let on_disk = names(&dir.join("profiles"));
    assert_eq!(rows, on_disk, "registry and profiles/ differ");
    for n in &rows {
        let p = dir.join("profiles").join(n);
        assert!(p.join("profile.toml").is_file(), "{n} has no spec");
        assert!(
            same_file(disk, &p.join("disks/data.img")),
            "{n}'s disk differs"
        );
        assert!(!p.join(".import-pending").exists(), "{n}: marker left");
    }
    rows
}

/// `pocketvisor` arguments as `&str`s.
fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn export_import_and_delete_killed_at_every_step() {
    let s = Scratch::new(SCRATCH, "killpts");
    let (dir_a, dir_b) = (s.path("a"), s.path("b"));
    let pass = passphrase_file(&s, "pass", PASSPHRASE);
    let mut a = Daemon::start(&dir_a, None);
    a.profile(&["create", "w", "--template", "work"]);
    let reference = s.path("data.ref");
    // Random data: enough for several progress events to kill in the middle of.
    {
        use std::io::Read;
        let mut src = std::fs::File::open("/dev/urandom").unwrap().take(8 << 20);
        let mut dst = std::fs::OpenOptions::new()
            .write(true)
            .open(dir_a.join("profiles/w/disks/data.img"))
            .unwrap();
        std::io::copy(&mut src, &mut dst).unwrap();
    }
    std::fs::copy(dir_a.join("profiles/w/disks/data.img"), &reference).unwrap();
    let out = s.path("w.pvp");
    let out_s = out.to_str().unwrap().to_string();
    let cmd = |verb: &str, dir: &Path, extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = vec![verb.into()];
        if verb == "export" {
            v.extend(["w".into(), "-o".into()]);
        }
        v.push(out_s.clone());
        v.extend([
            "--state-dir".into(),
            dir.to_str().unwrap().into(),
            "--passphrase-file".into(),
            pass.to_str().unwrap().into(),
        ]);
        v.extend(extra.iter().map(|x| x.to_string()));
        v
    };
    // A complete copy under `out` (not moving the profile).
    let copy_out = || {
        let args = cmd("export", &dir_a, &["--force", "--keep"]);
        assert_ok(&run(&strs(&args), &[FAST_KDF]), "export --keep");
    };
    let t0 = Instant::now();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();

    for _run in 0..runs() {
        let source = tree(&dir_a.join("profiles/w"));
        // Export: killed before its file is complete, the profile is not moved and the
        // file (none, or an older one it was to replace) is as before; killed after, the
        // profile is moved and the file is complete.
        for force in [false, true] {
            for point in [
                "export-marked",
                "midway",
                "export-written",
                "export-committed",
            ] {
                let old = if force {
                    copy_out();
                    Some(std::fs::read(&out).unwrap())
                } else {
                    let _ = std::fs::remove_file(&out);
                    None
                };
                let args = cmd("export", &dir_a, if force { &["--force"] } else { &[] });
                run_killed(&strs(&args), &[FAST_KDF], point);
                *counts.entry("export").or_default() += 1;
                let complete = matches!(point, "export-written" | "export-committed");
                let moved = moved_to(&a, "w");
                if complete {
                    assert_eq!(moved.as_deref(), Some(out_s.as_str()), "{point} {force}");
                    assert_ne!(std::fs::read(&out).ok(), old, "{point}: the old file");
                } else {
                    assert_eq!(moved, None, "{point} {force}: moved without its file");
                    assert_eq!(std::fs::read(&out).ok(), old, "{point}: the file changed");
                }
                // The profile's own files are untouched either way.
                let mut now = tree(&dir_a.join("profiles/w"));
                now.remove("moved");
                assert!(now == source, "{point}: the profile's files changed");
                // Debris only under a temporary name, and only from a kill in the data;
                // the next daemon start (new file) or the next export (--force) removes it.
                let debris = || -> Vec<String> {
                    names(&s.0)
                        .into_iter()
                        .filter(|n| n.starts_with("w.pvp.tmp-"))
                        .collect()
                };
                assert_eq!(debris().len(), usize::from(point == "midway"), "{point}");
                let _ = std::fs::remove_file(dir_a.join("profiles/w/moved"));
                if force {
                    copy_out();
                } else {
                    a.stop();
                    a = Daemon::start(&dir_a, None);
                }
                assert_eq!(
                    debris(),
                    Vec::<String>::new(),
                    "{point} {force}: debris kept"
                );
                *counts.entry("export debris swept").or_default() += 1;
            }
        }

        // Import, with a daemon on the target running: killed anywhere, the target ends
        // with the whole profile or (once the next daemon start swept) nothing.
        copy_out();
        let import = cmd("import", &dir_b, &[]);
        let mut b = Daemon::start(&dir_b, None);
        for point in [
            "midway",
            "import-staged",
            "import-renamed",
            "import-registered",
        ] {
            run_killed(&strs(&import), &[], point);
            *counts.entry("import").or_default() += 1;
            b.stop();
            b = Daemon::start(&dir_b, None);
            let present = consistent(&dir_b, &reference);
            if point == "import-registered" {
                assert_eq!(present, ["w"], "{point}");
                assert_eq!(rows(&dir_b)[0].1, "stopped");
                b.profile(&["delete", "w"]);
            } else {
                assert!(present.is_empty(), "{point}: {present:?}");
            }
            // The normal command works after it.
            assert_ok(&run(&strs(&import), &[]), "import after a killed one");
            assert_eq!(consistent(&dir_b, &reference), ["w"]);
            b.profile(&["delete", "w"]);
        }
        drop(b);

        // Delete, the daemon killed at each step: the next daemon finishes it.
        for point in ["delete-renamed", "delete-unregistered"] {
            a.stop();
            a = Daemon::start_env(&dir_a, None, &[(KILL_AT, point)]);
            let dir = dir_a.to_str().unwrap();
            let o = run(&["profile", "--state-dir", dir, "delete", "w"], &[]);
            assert!(!o.status.success(), "delete was not killed at {point}");
            *counts.entry("delete").or_default() += 1;
            a.stop();
            a = Daemon::start(&dir_a, None);
            assert_eq!(rows(&dir_a), [], "{point}: the row is left");
            assert!(
                names(&dir_a.join("profiles")).is_empty(),
                "{point}: files left"
            );
            // The name is free again: the profile comes back for the next round.
            let back = cmd("import", &dir_a, &[]);
            assert_ok(&run(&strs(&back), &[]), "import back");
            assert_eq!(consistent(&dir_a, &reference), ["w"]);
        }
    }
    loud(&format!(
        "MEASURE kill -9 at named points (export 4 points x 2 [new file, --force], import 4, \
         delete 2) x {} runs: {counts:?} kills in {:.1} s, every one settled",
        runs(),
        t0.elapsed().as_secs_f64()
    ));
}
