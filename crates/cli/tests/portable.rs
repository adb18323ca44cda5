//! The portable profile story end to end: a running probe guest on state directory A is
//! exported (suspended on the way), imported into state directory B and resumed there; its
//! counter goes on and its disk is identical. Plus the recipient-key round trip.
//!
//! The VM test needs /dev/kvm (a SKIP line is printed otherwise).

mod common;
mod portable_common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use portable_common::*;

const FAST_KDF: (&str, &str) = ("POCKETVISOR_KDF", "fast");

#[test]
fn suspended_guest_moves_to_another_state_dir_and_goes_on() {
    let Some(probe) = probe("suspended_guest_moves_to_another_state_dir_and_goes_on") else {
        return;
    };
    let s = Scratch::new(SCRATCH, "resume");
    let (dir_a, dir_b) = (s.path("a"), s.path("b"));
    let pass = passphrase_file(&s, "pass", PASSPHRASE);
    let out = s.path("work.pvp");

    let mut a = Daemon::start(&dir_a, Some(&probe));
    // A first profile takes vsock CID 3, so work gets 4.
    a.profile(&["create", "spare", "--template", "personal"]);
    a.profile(&["create", "work", "--template", "work"]);
    let disk_a = dir_a.join("profiles/work/disks/data.img");
    scribble(&disk_a, 42);
    a.profile(&["start", "work"]);
    let serial_a = dir_a.join("profiles/work/run/serial.log");
    assert!(
        wait_for(&serial_a, "PROBE counter 3\n", Duration::from_secs(30)),
        "no counter in A's serial log"
    );

    // The profile runs: export suspends it through the daemon first.
    let exported = run(
        &[
            "export",
            "work",
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            dir_a.to_str().unwrap(),
            "--passphrase-file",
            pass.to_str().unwrap(),
            "--json",
        ],
        &[FAST_KDF],
    );
    assert_ok(&exported, "export");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    // The key is derived before the guest is suspended (it runs meanwhile).
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(
        kinds[..3],
        ["deriving_key", "key_derived", "suspended"],
        "{kinds:?}"
    );
    assert!(events.iter().any(|e| e["event"] == "progress"));
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["state"], "suspended");
    assert_eq!(done["bytes_done"], done["bytes_total"]);
    assert_eq!(
        done["file_size"].as_u64().unwrap(),
        std::fs::metadata(&out).unwrap().len()
    );
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        rows(&dir_a),
        [
            ("spare".to_string(), "stopped".to_string()),
            ("work".to_string(), "suspended".to_string())
        ]
    );
    // The profile moved: A refuses to resume it (the guest would run twice), says why and
    // how to run it anyway; `list` shows where it went.
    assert_eq!(done["moved"], true);
    let again = run(
        &[
            "profile",
            "--state-dir",
            dir_a.to_str().unwrap(),
            "resume",
            "work",
        ],
        &[],
    );
    assert_one_error(&again, "was moved to");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--reclaim"));
    let list = a.profile(&["list"]);
    assert!(
        list.contains(&format!("moved to {}", out.display())),
        "{list}"
    );
    a.stop();

    // A's guest is gone: its log is final.
    let log_a = String::from_utf8_lossy(&std::fs::read(&serial_a).unwrap()).into_owned();
    let seen_a = counters(&log_a);
    let last_a = *seen_a.last().unwrap();
    assert!(last_a >= 3);

    // Import offline (no daemon on B), then resume with B's daemon.
    let imported = run(
        &[
            "import",
            out.to_str().unwrap(),
            "--state-dir",
            dir_b.to_str().unwrap(),
            "--json",
        ],
        &[("POCKETVISOR_PASSPHRASE", PASSPHRASE)],
    );
    assert_ok(&imported, "import");
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&imported.stdout)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["event"], "done");
    assert_eq!(last["profile"], "work");
    // The CID is free on B: the profile keeps the one its guest was given on A.
    assert_eq!(last["vsock_cid"], 4);
    assert_eq!(
        rows(&dir_b),
        [("work".to_string(), "suspended".to_string())]
    );
    let disk_b = dir_b.join("profiles/work/disks/data.img");
    assert!(same_file(&disk_a, &disk_b), "B's disk differs from A's");
    for f in ["state.bin", "memory.bin"] {
        let (fa, fb) = (
            dir_a.join("profiles/work/snapshot").join(f),
            dir_b.join("profiles/work/snapshot").join(f),
        );
        assert!(same_file(&fa, &fb), "snapshot {f} differs");
    }

    // Another device: nothing of A may be used by B's VM (a restore with A's saved disk path
    // would fail now).
    let moved = s.path("a-profile");
    std::fs::rename(dir_a.join("profiles/work"), &moved).unwrap();
    let disk_a = moved.join("disks/data.img");

    let b = Daemon::start(&dir_b, Some(&probe));
    b.profile(&["resume", "work"]);
    let serial_b = dir_b.join("profiles/work/run/serial.log");
    let want = format!("PROBE counter {}\n", last_a + 3);
    assert!(
        wait_for(&serial_b, &want, Duration::from_secs(30)),
        "B's guest did not go on to {want:?}: {}",
        String::from_utf8_lossy(&std::fs::read(&serial_b).unwrap_or_default())
    );
    // What the guest wrote on A then on B is one unbroken count.
    let log_b = String::from_utf8_lossy(&std::fs::read(&serial_b).unwrap()).into_owned();
    let all = counters(&format!("{log_a}{log_b}"));
    let expected: Vec<u64> = (0..all.len() as u64).collect();
    assert_eq!(all, expected, "the count breaks between A and B");
    let first_b = counters(&log_b)[0];
    assert!(
        first_b == last_a + 1 || (first_b == last_a + 2 && !log_a.ends_with('\n')),
        "B starts at {first_b}, A ended at {last_a}"
    );
    assert_eq!(rows(&dir_b), [("work".to_string(), "running".to_string())]);
    b.profile(&["stop", "work"]);
    // The guest never wrote its disk: B's is still A's.
    assert!(same_file(&disk_a, &disk_b));
}

#[test]
fn recipient_key_round_trip() {
    let s = Scratch::new(SCRATCH, "recipient");
    let (dir_a, dir_b) = (s.path("a"), s.path("b"));
    let a = Daemon::start(&dir_a, None);
    a.profile(&["create", "lab", "--template", "personal"]);
    let disk_a = dir_a.join("profiles/lab/disks/data.img");
    scribble(&disk_a, 7);

    let key = s.path("org.key");
    let kg = run(&["keygen", "-o", key.to_str().unwrap()], &[]);
    assert_ok(&kg, "keygen");
    let public = String::from_utf8_lossy(&kg.stdout).trim().to_string();
    assert!(public.starts_with("pvp-public-"), "{public}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // keygen never overwrites an identity.
    let again = run(&["keygen", "-o", key.to_str().unwrap()], &[]);
    assert_one_error(&again, "cannot create");

    let out = s.path("lab.pvp");
    // Only a recipient: no passphrase is asked for (stdin is not a terminal anyway).
    let exported = run(
        &[
            "export",
            "lab",
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            dir_a.to_str().unwrap(),
            "--recipient",
            &public,
        ],
        &[],
    );
    assert_ok(&exported, "export --recipient");
    assert!(String::from_utf8_lossy(&exported.stdout).contains("exported lab (stopped"));
    // An existing file is not replaced without --force, and stays as it was.
    let before = std::fs::read(&out).unwrap();
    let export_again = |extra: &[&str]| {
        let mut args = vec![
            "export",
            "lab",
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            dir_a.to_str().unwrap(),
            "--recipient",
            &public,
        ];
        args.extend_from_slice(extra);
        run(&args, &[])
    };
    assert_one_error(&export_again(&[]), "give --force to replace it");
    assert_eq!(std::fs::read(&out).unwrap(), before);
    assert_ok(&export_again(&["--force"]), "export --force");
    assert_ne!(
        std::fs::read(&out).unwrap(),
        before,
        "a new file (new nonce)"
    );

    // Another identity and a passphrase cannot open it.
    let other = s.path("other.key");
    assert_ok(
        &run(&["keygen", "-o", other.to_str().unwrap()], &[]),
        "keygen",
    );
    let dir_b_s = dir_b.to_str().unwrap();
    let wrong = run(
        &[
            "import",
            out.to_str().unwrap(),
            "--state-dir",
            dir_b_s,
            "--identity",
            other.to_str().unwrap(),
        ],
        &[],
    );
    assert_one_error(&wrong, "wrong passphrase or key");
    let wrong = run(
        &["import", out.to_str().unwrap(), "--state-dir", dir_b_s],
        &[("POCKETVISOR_PASSPHRASE", PASSPHRASE)],
    );
    assert_one_error(&wrong, "wrong passphrase or key");
    // No key at all: the error says a recipient file opens with --identity.
    let no_key = run(
        &["import", out.to_str().unwrap(), "--state-dir", dir_b_s],
        &[],
    );
    assert_one_error(&no_key, "--identity KEYFILE");
    assert!(
        !dir_b.exists(),
        "a failed import created {}",
        dir_b.display()
    );

    // B's daemon runs during the import and sees the new profile at once.
    let b = Daemon::start(&dir_b, None);
    let imported = run(
        &[
            "import",
            out.to_str().unwrap(),
            "--state-dir",
            dir_b_s,
            "--identity",
            key.to_str().unwrap(),
            "--name",
            "lab2",
        ],
        &[],
    );
    assert_ok(&imported, "import --identity");
    // The hint names the state directory the profile went to.
    let said = String::from_utf8_lossy(&imported.stdout);
    assert!(
        said.contains(&format!(
            "next: pocketvisor profile --state-dir {dir_b_s} start lab2"
        )),
        "{said}"
    );
    assert_eq!(rows(&dir_b), [("lab2".to_string(), "stopped".to_string())]);
    // The name is taken now: refused, with the way out.
    let again = run(
        &[
            "import",
            out.to_str().unwrap(),
            "--state-dir",
            dir_b_s,
            "--identity",
            key.to_str().unwrap(),
            "--name",
            "lab2",
        ],
        &[],
    );
    assert_one_error(&again, "already exists");
    assert!(String::from_utf8_lossy(&again.stderr).contains("--name NEW"));
    assert!(same_file(
        &disk_a,
        &dir_b.join("profiles/lab2/disks/data.img")
    ));
    let spec = std::fs::read_to_string(dir_b.join("profiles/lab2/profile.toml")).unwrap();
    assert!(spec.contains("name = \"lab2\""), "{spec}");
    // The personal template's channel policy came along.
    assert!(
        spec.contains("clipboard_to = [\"work\", \"host\"]"),
        "{spec}"
    );
    let shown = b.profile(&["show", "lab2"]);
    assert!(shown.contains("stopped"), "{shown}");
}

#[test]
fn export_with_resume_leaves_the_guest_running() {
    let Some(probe) = probe("export_with_resume_leaves_the_guest_running") else {
        return;
    };
    let s = Scratch::new(SCRATCH, "keep-running");
    let dir_a = s.path("a");
    let out = s.path("copy.pvp");
    let a = Daemon::start(&dir_a, Some(&probe));
    a.profile(&["create", "work", "--template", "work"]);
    a.profile(&["start", "work"]);
    let serial = dir_a.join("profiles/work/run/serial.log");
    assert!(wait_for(
        &serial,
        "PROBE counter 2\n",
        Duration::from_secs(30)
    ));
    let exported = run(
        &[
            "export",
            "work",
            "-o",
            out.to_str().unwrap(),
            "--state-dir",
            dir_a.to_str().unwrap(),
            "--resume",
            "--json",
        ],
        &[FAST_KDF, ("POCKETVISOR_PASSPHRASE", PASSPHRASE)],
    );
    assert_ok(&exported, "export --resume");
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&exported.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[..3], ["deriving_key", "key_derived", "suspended"]);
    assert_eq!(&kinds[kinds.len() - 2..], ["resumed", "done"]);
    assert_eq!(events.last().unwrap()["resumed"], true);
    // A copy (--resume implies --keep): not marked as moved.
    assert_eq!(events.last().unwrap()["moved"], false);
    assert_eq!(events.last().unwrap()["state"], "suspended");
    assert_eq!(rows(&dir_a), [("work".to_string(), "running".to_string())]);
    // The guest goes on at the source.
    let last = *counters(&String::from_utf8_lossy(&std::fs::read(&serial).unwrap()))
        .last()
        .unwrap();
    let want = format!("PROBE counter {}\n", last + 2);
    assert!(
        wait_for(&serial, &want, Duration::from_secs(30)),
        "no {want:?} after the export"
    );
    // The file holds the suspended moment.
    let dir_b = s.path("b");
    let imported = run(
        &[
            "import",
            out.to_str().unwrap(),
            "--state-dir",
            dir_b.to_str().unwrap(),
        ],
        &[("POCKETVISOR_PASSPHRASE", PASSPHRASE)],
    );
    assert_ok(&imported, "import");
    assert_eq!(
        rows(&dir_b),
        [("work".to_string(), "suspended".to_string())]
    );
    a.profile(&["stop", "work"]);
}

#[test]
fn ctrl_c_during_export_leaves_the_profile_as_it_was() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let Some(probe) = probe("ctrl_c_during_export_leaves_the_profile_as_it_was") else {
        return;
    };
    let s = Scratch::new(SCRATCH, "ctrl-c");
    let dir_a = s.path("a");
    let out = s.path("work.pvp");
    let a = Daemon::start(&dir_a, Some(&probe));
    a.profile(&["create", "work", "--template", "work"]);
    // Enough incompressible data that the export is still writing when Ctrl-C comes.
    let disk = dir_a.join("profiles/work/disks/data.img");
    let mut src = std::fs::File::open("/dev/urandom").unwrap().take(48 << 20);
    let mut dst = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::io::copy(&mut src, &mut dst).unwrap();
    a.profile(&["start", "work"]);

    let mut child = Command::new(bin())
        .args(["export", "work", "-o", out.to_str().unwrap(), "--state-dir"])
        .arg(&dir_a)
        .arg("--json")
        .env("POCKETVISOR_PASSPHRASE", PASSPHRASE)
        .env(FAST_KDF.0, FAST_KDF.1)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut interrupted = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let (done, total) = (v["bytes_done"].as_u64(), v["bytes_total"].as_u64());
        if v["event"] == "progress" && done > Some(0) && done < total {
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
            interrupted = true;
            break;
        }
    }
    assert!(interrupted, "the export ended before Ctrl-C");
    let status = child.wait().unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    // As it was: running again, no file, not marked as moved.
    assert_eq!(rows(&dir_a), [("work".to_string(), "running".to_string())]);
    assert!(!out.exists());
    assert!(!dir_a.join("profiles/work/moved").exists());
    a.profile(&["stop", "work"]);
}
