//! kill -9 in the middle of an export or import leaves nothing under the final name.
//!
//! The work runs in a child process (this test binary, running `kill_helper`), which is
//! SIGKILLed once it has written part of its output.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const MODE: &str = "VAULT_KILL_HELPER";
const DIR: &str = "VAULT_KILL_DIR";

#[test]
#[ignore = "helper run in a child process by the kill_9 tests"]
fn kill_helper() {
    let (Ok(mode), Ok(dir)) = (std::env::var(MODE), std::env::var(DIR)) else {
        return;
    };
    let dir = Path::new(&dir);
    let mut started = false;
    let mut stall = |p: vault::Progress| {
        if !started && p.bytes_done > 0 {
            started = true;
            std::fs::write(dir.join("started"), b"").unwrap();
            std::thread::sleep(Duration::from_secs(60));
        }
    };
    match mode.as_str() {
        "export" => {
            let entries = big_profile(dir);
            let out = dir.join("work.pvp");
            let _ = vault::export_with(
                &out,
                manifest(),
                &entries,
                &[pass_key(PASSPHRASE)],
                &SMALL_CHUNKS,
                &mut stall,
            );
        }
        "import" => {
            let _ = vault::import(
                &dir.join("work.pvp"),
                &pass_unlock(PASSPHRASE),
                &dir.join("dest"),
                &mut stall,
            );
        }
        other => panic!("unknown mode {other}"),
    }
}

/// Runs `kill_helper` in `mode`, waits until it is mid-way, and SIGKILLs it.
fn run_and_kill(mode: &str, dir: &Path) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "kill_helper", "--ignored", "--test-threads", "1"])
        .env(MODE, mode)
        .env(DIR, dir)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !dir.join("started").exists() {
        assert!(Instant::now() < deadline, "the helper never started");
        assert!(
            child.try_wait().unwrap().is_none(),
            "the helper exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::remove_file(dir.join("started")).unwrap();
}

#[test]
fn kill_9_during_export_and_import() {
    let dir = tempfile::tempdir().unwrap();

    run_and_kill("export", dir.path());
    assert!(!dir.path().join("work.pvp").exists());
    // The partial output is only under a temporary name.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("work.pvp.tmp-"))
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");

    // A complete file to import.
    let entries = big_profile(dir.path());
    vault::export_with(
        &dir.path().join("work.pvp"),
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE)],
        &SMALL_CHUNKS,
        &mut |_| {},
    )
    .unwrap();
    run_and_kill("import", dir.path());
    assert!(!dir.path().join("dest").exists());
    // A new import still works.
    vault::import(
        &dir.path().join("work.pvp"),
        &pass_unlock(PASSPHRASE),
        &dir.path().join("dest"),
        &mut |_| {},
    )
    .unwrap();
    assert!(dir.path().join("dest/disk.raw").exists());
}
