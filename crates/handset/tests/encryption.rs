//! Encryption at rest with real probe guests: a profile created with `encrypt_at_rest` keeps
//! only ciphertext in its host disk file, and its guest reads its own writes back after a
//! restart, a suspend and resume, and an export and import into another handset (another
//! device key); a copy of the disk file without the key does not.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{can_run_vms, pv_bin, wait_until, Daemon};
use handset::{CreateProfile, ProfileInfo, ProfileSpec};

/// What the probe's `pv.mode=blk-counter` (and `pv.blk.write=0`) writes at sector 0.
const MARKER: &[u8] = b"pocketvisor-probe-blk:";

/// FNV-1a 64 (the probe's `sector0_fnv`).
fn fnv1a64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The `sector0_fnv=` the probe prints when sector 0 holds its pattern for sector 0.
fn marker_fnv() -> String {
    let unit = b"pocketvisor-probe-blk:0\n";
    let sector0: Vec<u8> = unit.iter().copied().cycle().take(512).collect();
    format!("sector0_fnv={:016x}", fnv1a64(&sector0))
}

fn create(d: &Daemon, name: &str, cmdline: &str, encrypted: bool) -> ProfileInfo {
    let text = format!(
        "name = \"{name}\"\nkernel = \"probe\"\ncmdline = \"{cmdline}\"\nmemory_mib = 128\n\
         restart = \"never\"\ndisks = [{{ name = \"data\", size_mib = 8 }}]\n"
    );
    let req = CreateProfile {
        spec: Some(ProfileSpec::from_toml(&text).unwrap()),
        encrypt_at_rest: encrypted,
        ..Default::default()
    };
    d.client().call("POST", "/v1/profiles", Some(&req)).unwrap()
}

fn disk(d: &Daemon, name: &str) -> std::path::PathBuf {
    d.dir.join(format!("profiles/{name}/disks/data.img"))
}

/// Whether `bytes` hold the probe's marker anywhere.
fn holds_marker(bytes: &[u8]) -> bool {
    bytes.windows(MARKER.len()).any(|w| w == MARKER)
}

/// The highest `PROBE blk-counter N` in a serial log.
fn blk_counter(serial: &str) -> Option<u64> {
    serial
        .lines()
        .filter_map(|l| l.trim_end().strip_prefix("PROBE blk-counter "))
        .filter_map(|n| n.trim().parse().ok())
        .max()
}

/// Waits until the guest of `name` wrote past blk-counter `n`; the new highest value.
fn wait_blk_counter_past(d: &Daemon, name: &str, n: Option<u64>) -> u64 {
    let past = n.unwrap_or(2);
    let mut last = None;
    let ok = wait_until(Duration::from_secs(60), || {
        last = blk_counter(&d.serial(name));
        last.is_some_and(|v| v > past)
    });
    assert!(
        ok,
        "{name}: no blk-counter past {n:?}: {}\n{}\nvmm.log: {}",
        d.serial(name),
        d.log(),
        vmm_log(d, name)
    );
    last.unwrap()
}

fn vmm_log(d: &Daemon, name: &str) -> String {
    let run = d.dir.join(format!("profiles/{name}/run"));
    ["vmm.log.prev", "vmm.log"]
        .iter()
        .map(|f| std::fs::read_to_string(run.join(f)).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Boots `name` with the probe's read-only blk test and returns its `blk ok` line.
fn boot_blk_test(d: &Daemon, name: &str) -> String {
    let set = d.cli(&["set", name, "cmdline=pv.tests=blk"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    d.act(name, "start").unwrap();
    // Whole lines: the log may be read between two bytes of one.
    let ok = wait_until(Duration::from_secs(60), || {
        let serial = d.serial(name);
        serial.contains("PROBE done ok\n") || serial.contains("PROBE done fail")
    });
    let serial = d.serial(name);
    assert!(
        ok && serial.contains("PROBE done ok"),
        "{name}: {serial}\n{}",
        vmm_log(d, name)
    );
    assert!(
        wait_until(Duration::from_secs(20), || d.show(name).state.as_str()
            == "stopped"),
        "{name} did not stop after its guest powered off"
    );
    serial
        .lines()
        .find(|l| l.contains("PROBE blk ok"))
        .unwrap_or_default()
        .to_string()
}

fn pv(dir: &Path, args: &[&str]) -> Output {
    Command::new(pv_bin())
        .args(args)
        .arg("--state-dir")
        .arg(dir)
        .env("POCKETVISOR_KDF", "fast")
        .output()
        .unwrap()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_encrypted_profile_keeps_only_ciphertext_on_the_host_and_travels_with_its_key() {
    if !can_run_vms("an_encrypted_profile_keeps_only_ciphertext_on_the_host") {
        return;
    }
    let want = marker_fnv();
    // Jailed VMMs here (`pocketvisor vmm --disk-keys-stdin`, boot and restore); the importing
    // handset below runs them unjailed (`run` and `restore`).
    let d1 = Daemon::start("enc1");
    let p = create(&d1, "work", "pv.mode=blk-counter pv.counter.ms=50", true);
    assert!(p.spec.encrypt_at_rest);
    let wrapped = std::fs::read(d1.dir.join("profiles/work/disk.key")).unwrap();
    assert_eq!(wrapped.len(), handset::disk_keys::WRAPPED_LEN);
    assert!(d1.dir.join("device.key").is_file());
    // A key is chosen at create only.
    let set = d1.cli(&["set", "work", "encrypt_at_rest=false"]);
    assert!(!set.status.success());

    // The guest writes its marker at sector 0 (and on): none of it reaches the file in clear.
    d1.act("work", "start").unwrap();
    wait_blk_counter_past(&d1, "work", None);
    d1.act("work", "suspend").unwrap();
    let before = blk_counter(&d1.serial("work")).unwrap();
    let bytes = std::fs::read(disk(&d1, "work")).unwrap();
    assert!(bytes[..4096].iter().any(|&b| b != 0), "nothing was written");
    assert!(
        !holds_marker(&bytes),
        "the guest's marker is in the host file in clear"
    );
    // The suspended guest's memory (which holds the marker it wrote) is encrypted too.
    let memory = std::fs::read(d1.dir.join("profiles/work/snapshot/memory.bin")).unwrap();
    assert!(memory.iter().any(|&b| b != 0));
    assert!(
        !holds_marker(&memory),
        "the guest's RAM is in the snapshot in clear"
    );

    // Exported suspended (a copy: the profile stays here too).
    let tmp = tempfile::tempdir().unwrap();
    let pass = tmp.path().join("pass");
    std::fs::write(&pass, "correct horse battery\n").unwrap();
    let file = tmp.path().join("work.pvp");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    ok(
        &pv(
            &d1.dir,
            &[
                "export",
                "work",
                "-o",
                &s(&file),
                "--passphrase-file",
                &s(&pass),
                "--keep",
            ],
        ),
        "export",
    );

    // Resumed with its key, the guest goes on writing through the cipher.
    d1.act("work", "resume").unwrap();
    let after = wait_blk_counter_past(&d1, "work", Some(before));
    assert!(after > before);
    d1.act("work", "stop").unwrap();
    assert!(!holds_marker(&std::fs::read(disk(&d1, "work")).unwrap()));
    // Booted again, the guest reads its sector 0 back.
    let line = boot_blk_test(&d1, "work");
    assert!(line.contains(&want), "{want} not in {line:?}");

    // (A plain profile's snapshot does hold the marker: the check above would see it.)
    create(&d1, "plain", "pv.mode=blk-counter pv.counter.ms=50", false);
    d1.act("plain", "start").unwrap();
    wait_blk_counter_past(&d1, "plain", None);
    d1.act("plain", "suspend").unwrap();
    let memory = std::fs::read(d1.dir.join("profiles/plain/snapshot/memory.bin")).unwrap();
    assert!(holds_marker(&memory));
    d1.act("plain", "stop?discard=true").unwrap();

    // A copy of the disk file without the key reads as noise.
    let copy = std::fs::read(disk(&d1, "work")).unwrap();
    create(&d1, "thief", "pv.tests=blk", false);
    std::fs::write(disk(&d1, "thief"), &copy).unwrap();
    let line = boot_blk_test(&d1, "thief");
    assert!(
        line.contains("sector0_fnv=") && !line.contains(&want),
        "{line}"
    );

    // Another handset (its own device key, unjailed VMMs) imports the suspended profile and
    // resumes it where it was.
    let d2 = Daemon::start_with("enc2", &["--no-jail"]);
    ok(
        &pv(
            &d2.dir,
            &["import", &s(&file), "--passphrase-file", &s(&pass)],
        ),
        "import",
    );
    let wrapped2 = std::fs::read(d2.dir.join("profiles/work/disk.key")).unwrap();
    assert_ne!(
        wrapped2, wrapped,
        "the importer wraps the key under its own device key"
    );
    assert_ne!(
        std::fs::read(d2.dir.join("device.key")).unwrap(),
        std::fs::read(d1.dir.join("device.key")).unwrap()
    );
    assert!(!holds_marker(&std::fs::read(&file).unwrap()));
    d2.act("work", "resume").unwrap();
    wait_blk_counter_past(&d2, "work", Some(before));
    d2.act("work", "stop").unwrap();
    assert!(!holds_marker(&std::fs::read(disk(&d2, "work")).unwrap()));
    let line = boot_blk_test(&d2, "work");
    assert!(line.contains(&want), "{want} not in {line:?}");

    // The first handset's wrapped key does not open on the second.
    std::fs::write(d2.dir.join("profiles/work/disk.key"), &wrapped).unwrap();
    let e = d2.act("work", "start").unwrap_err();
    assert!(e.to_string().contains("device key"), "{e}");
}

/// Applies a signed policy for `profile` with `storage.encrypt_at_rest = true`.
fn apply_encrypting_policy(d: &Daemon, profile: &str, version: u64) {
    let org = policy::OrgSecretKey::generate();
    let dir = handset::StateDir::new(&d.dir).unwrap();
    handset::org_policy::trust(&dir, &org.public(), true).unwrap();
    let doc = format!(
        "version = {version}\nissued_at = {}\nprofile = \"{profile}\"\n\
         [storage]\nencrypt_at_rest = true\n",
        policy::unix_now() - 60
    );
    let envelope = String::from_utf8(policy::sign(doc.as_bytes(), &org).unwrap()).unwrap();
    let body = serde_json::json!({ "envelope": envelope });
    let _: serde_json::Value = d
        .client()
        .call("POST", "/v1/policies", Some(&body))
        .unwrap();
}

#[test]
fn a_policy_that_asks_for_encryption_refuses_a_plain_profile() {
    let d = Daemon::start("encpol");
    create(&d, "plain", "pv.tests=blk", false);
    create(&d, "sealed", "pv.tests=blk", true);
    apply_encrypting_policy(&d, "plain", 1);
    let e = d.act("plain", "start").unwrap_err().to_string();
    assert!(
        e.contains("asks for encryption at rest") && e.contains("--encrypt"),
        "{e}"
    );
    let audit: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?profile=plain&limit=100", None::<&()>)
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.event == "start-refused" && a.detail.contains("encryption at rest")),
        "{audit:?}"
    );
    // The encrypted profile under the same rule starts (its guest runs its blk test).
    apply_encrypting_policy(&d, "sealed", 1);
    if can_run_vms("a_policy_that_asks_for_encryption_refuses_a_plain_profile (start)") {
        let line = boot_blk_test(&d, "sealed");
        assert!(line.contains("sector0_fnv="), "{line}");
    }
}

#[test]
fn a_wipe_crypto_erases_first_and_a_killed_wipe_finishes_at_the_next_start() {
    if !can_run_vms("a_wipe_crypto_erases_first") {
        return;
    }
    let want = marker_fnv();
    let mut d = Daemon::start("wipe");
    // The guest writes its marker at sector 0 and powers off.
    create(&d, "work", "pv.tests=blk pv.blk.write=0", true);
    d.act("work", "start").unwrap();
    assert!(
        wait_until(Duration::from_secs(60), || d.show("work").state.as_str()
            == "stopped"),
        "{}",
        d.serial("work")
    );
    assert!(d.serial("work").contains("wrote=0"), "{}", d.serial("work"));
    let copy = std::fs::read(disk(&d, "work")).unwrap();
    assert!(!holds_marker(&copy));
    let out = d.cli(&["wipe", "work"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("data key destroyed"));
    assert!(!d.dir.join("profiles/work").exists());
    assert!(d.show_all_names().is_empty());
    let audit: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=100", None::<&()>)
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.event == "wipe" && a.detail.starts_with("crypto-erased")),
        "{audit:?}"
    );
    // The copy taken before the wipe: a new profile of the same name (a new key) reads noise.
    create(&d, "work", "pv.tests=blk", true);
    std::fs::write(disk(&d, "work"), &copy).unwrap();
    let line = boot_blk_test(&d, "work");
    assert!(
        line.contains("sector0_fnv=") && !line.contains(&want),
        "{line}"
    );

    // Killed at each step of a wipe, the next daemon finishes it: the key gone, then the
    // profile.
    for point in [
        "wipe-marked",
        "wipe-overwritten",
        "wipe-erased",
        "delete-renamed",
    ] {
        d.kill9();
        d.env = vec![(handset::fault::KILL_AT_VAR.to_string(), point.to_string())];
        d.spawn();
        create(&d, "doomed", "pv.tests=blk", true);
        let key = d.dir.join("profiles/doomed/disk.key");
        let wrapped = std::fs::read(&key).unwrap();
        let _ = d.cli(&["wipe", "doomed"]);
        assert!(
            wait_until(Duration::from_secs(10), || d
                .child
                .as_mut()
                .unwrap()
                .try_wait()
                .unwrap()
                .is_some()),
            "{point}: the daemon was not killed"
        );
        d.child = None;
        // Up to its kill point the key is there, or overwritten: never the old one intact
        // once the overwrite ran.
        if point != "wipe-marked" {
            assert_ne!(std::fs::read(&key).ok(), Some(wrapped.clone()), "{point}");
        }
        d.env.clear();
        d.spawn();
        assert!(
            !d.show_all_names().contains(&"doomed".to_string()),
            "{point}: the wipe was not finished"
        );
        assert!(!d.dir.join("profiles/doomed").exists(), "{point}");
        assert!(!d.dir.join("profiles/.deleting-doomed").exists(), "{point}");
    }
}
