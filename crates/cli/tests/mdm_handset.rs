//! The handset's side of the MDM, with real processes: `pocketvisor mdm serve` and
//! `pocketvisor handset --mdm URL --enroll TOKEN --mdm-ca ca.pem`; each test with the server
//! on SQLite and on PostgreSQL (`NAME::sqlite`, `NAME::postgres`; the PostgreSQL half is
//! skipped loudly without PostgreSQL, and fails then under `CI`).

mod mdm_common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use mdm_common::{wait_until, Handset, Server, Store};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn a_handset_enrolls_once_works_offline_and_reconnects(store: Store) {
    let tmp = tempfile::tempdir().unwrap();
    let srv_dir = tmp.path().join("mdm");
    std::fs::create_dir(&srv_dir).unwrap();
    store.keep_in(&srv_dir);
    let mut server = Server::start(&srv_dir, 0, 2);
    let token = server.token();
    let hs_dir = tmp.path().join("hs");
    let first: Vec<String> = vec![
        "--mdm".into(),
        server.url(),
        "--enroll".into(),
        token.clone(),
        "--mdm-ca".into(),
        server.ca().display().to_string(),
    ];
    let mut hs = Handset::start(&hs_dir, &first);
    assert!(
        wait_until(Duration::from_secs(60), || hs.mdm_state().as_deref()
            == Some("connected")),
        "{:?}\n{}",
        hs.info().and_then(|i| i.mdm),
        hs.log()
    );
    let device = hs.info().unwrap().mdm.unwrap().device_id.unwrap();
    // The device key and certificate are kept owner-only.
    for f in ["device-key.pk8", "enrollment.json"] {
        assert_eq!(mode(&hs_dir.join("mdm").join(f)), 0o600, "{f}");
    }
    let out = hs.ok(&["status"]);
    assert!(out.contains("connected") && out.contains(&device), "{out}");
    // Its first report reached the server (no managed profile yet: an empty list).
    assert!(wait_until(Duration::from_secs(30), || server
        .compliance(&device)
        .is_some()));
    assert_eq!(
        server.compliance(&device).unwrap()["profiles"],
        serde_json::json!([])
    );

    // A second start needs no token and does not enroll again.
    hs.terminate();
    hs.args = vec!["--mdm".into(), server.url()];
    hs.spawn();
    assert!(wait_until(Duration::from_secs(60), || hs
        .mdm_state()
        .as_deref()
        == Some("connected")));
    assert_eq!(hs.info().unwrap().mdm.unwrap().device_id.unwrap(), device);
    let enrolls = server
        .audit()
        .iter()
        .filter(|(_, action, _)| action == "enroll")
        .count();
    assert_eq!(enrolls, 1);

    // The server goes away: the daemon says so and keeps working.
    let port = server.port;
    server.stop();
    assert!(
        wait_until(Duration::from_secs(60), || hs.mdm_state().as_deref()
            == Some("unreachable")),
        "{:?}",
        hs.info().and_then(|i| i.mdm)
    );
    hs.ok(&["create", "personal", "--template", "personal"]);
    let out = hs.ok(&["list"]);
    assert!(out.contains("personal"), "{out}");
    let out = hs.ok(&["status"]);
    assert!(out.contains("unreachable"), "{out}");

    // Back on the same address: the daemon reconnects by itself (backoff at most 16 s).
    let server = Server::start(&srv_dir, port, 2);
    assert!(
        wait_until(Duration::from_secs(90), || hs.mdm_state().as_deref()
            == Some("connected")),
        "{:?}\n{}",
        hs.info().and_then(|i| i.mdm),
        hs.log()
    );
    // Still one enrollment, and the token cannot be used again.
    assert_eq!(
        server
            .audit()
            .iter()
            .filter(|(_, action, _)| action == "enroll")
            .count(),
        1
    );
    let other = tmp.path().join("hs2");
    let mut again = first.clone();
    again[1] = server.url();
    let mut hs2 = Handset::start(&other, &again);
    assert!(wait_until(Duration::from_secs(60), || hs2
        .mdm_state()
        .as_deref()
        == Some("refused")));
    assert!(!other.join("mdm/enrollment.json").exists());
    hs2.terminate();
    // Not enrolled and no token: refused at the start, before anything runs.
    let out = std::process::Command::new(mdm_common::BIN)
        .args(["handset", "--http", "off", "--state-dir"])
        .arg(tmp.path().join("hs3"))
        .args(["--mdm", &server.url()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        mdm_common::text(&out).contains("--enroll"),
        "{}",
        mdm_common::text(&out)
    );
}
on_both_stores!(a_handset_enrolls_once_works_offline_and_reconnects);

fn sha256_of(path: &std::path::Path) -> String {
    handset::org_policy::sha256_file(path).unwrap()
}

/// Signs `version` of a policy for `profile` with org.key in `dir`; the signed file's path.
fn signed_policy(dir: &std::path::Path, profile: &str, version: u64) -> String {
    let doc = dir.join(format!("{profile}-v{version}.toml"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    std::fs::write(
        &doc,
        format!(
            "version = {version}\nissued_at = {now}\nprofile = \"{profile}\"\n\n[screen]\ncapture = false\n"
        ),
    )
    .unwrap();
    let out = dir.join(format!("{profile}-v{version}.pvpol"));
    let signed = std::process::Command::new(mdm_common::BIN)
        .args(["policy", "sign", "--key"])
        .arg(dir.join("org.key"))
        .arg(&doc)
        .arg("-o")
        .arg(&out)
        .output()
        .unwrap();
    assert!(signed.status.success(), "{}", mdm_common::text(&signed));
    out.display().to_string()
}

struct Setup {
    tmp: tempfile::TempDir,
    server: Server,
    hs: Handset,
    device: String,
}

/// A server and an enrolled handset trusting org.key.pub, with `work` (managed, encrypted
/// at rest) and `personal` (not managed, booting its own copy of the probe kernel), both
/// stopped. The MDM holds long polls `long_poll` s.
fn setup(long_poll: u64, store: &Store) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let srv_dir = tmp.path().join("mdm");
    std::fs::create_dir(&srv_dir).unwrap();
    store.keep_in(&srv_dir);
    let server = Server::start(&srv_dir, 0, long_poll);
    // The state went to the store asked for: SQLite's file only without PostgreSQL.
    assert_eq!(
        srv_dir.join("state/mdm.db").exists(),
        matches!(store, Store::Sqlite)
    );
    let token = server.token();
    let keygen = std::process::Command::new(mdm_common::BIN)
        .args(["policy", "keygen", "-o"])
        .arg(tmp.path().join("org.key"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", mdm_common::text(&keygen));
    let hs_dir = tmp.path().join("hs");
    let args: Vec<String> = vec![
        "--mdm".into(),
        server.url(),
        "--enroll".into(),
        token,
        "--mdm-ca".into(),
        server.ca().display().to_string(),
        "--org-key".into(),
        tmp.path().join("org.key.pub").display().to_string(),
    ];
    let hs = Handset::start(&hs_dir, &args);
    assert!(wait_until(Duration::from_secs(60), || hs
        .mdm_state()
        .as_deref()
        == Some("connected")));
    let device = hs.info().unwrap().mdm.unwrap().device_id.unwrap();
    hs.ok(&[
        "create",
        "work",
        "--template",
        "work",
        "--managed",
        "--encrypt",
    ]);
    Setup {
        tmp,
        server,
        hs,
        device,
    }
}

/// Creates `personal` booting `assets/personal-probe.elf`: the probe with bytes of its own
/// after it (a kernel whose hash differs from work's). Returns that hash.
fn create_personal(hs: &Handset) -> String {
    let probe = std::fs::read(hs.info().unwrap().probe.expect("the probe guest is built")).unwrap();
    let mut kernel = probe;
    kernel.extend_from_slice(b"\0personal build\0");
    let assets = hs.dir.join("assets");
    std::fs::create_dir_all(&assets).unwrap();
    let file = assets.join("personal-probe.elf");
    std::fs::write(&file, &kernel).unwrap();
    hs.ok(&[
        "create",
        "personal",
        "--template",
        "personal",
        "--kernel",
        "personal-probe.elf",
    ]);
    sha256_of(&file)
}

fn profile(hs: &Handset, name: &str) -> handset::ProfileInfo {
    hs.client()
        .call("GET", &format!("/v1/profiles/{name}"), None::<&()>)
        .unwrap()
}

fn commands_act_on_managed_profiles_only_and_the_personal_profile_stays_private(store: Store) {
    let Setup {
        tmp,
        server,
        hs,
        device,
    } = setup(2, &store);
    let personal_hash = create_personal(&hs);
    let work_hash = sha256_of(std::path::Path::new(&hs.info().unwrap().probe.unwrap()));
    let can_run = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if can_run {
        hs.ok(&["start", "work"]);
    } else {
        eprintln!("no usable /dev/kvm: the lock is checked on a stopped profile");
    }

    // The report names work only, with its kernel's hash.
    let report = || server.compliance(&device).unwrap_or_default();
    assert!(
        wait_until(Duration::from_secs(60), || report()["profiles"][0]["name"]
            == "work"),
        "{}",
        report()
    );
    let r = report();
    assert_eq!(r["profiles"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["profiles"][0]["kernel_sha256"], work_hash.as_str());
    assert_eq!(
        r["vmm_sha256"],
        sha256_of(std::path::Path::new(mdm_common::BIN)).as_str()
    );

    // Aimed at personal by name: refused by the device, which changes nothing.
    for kind in ["lock", "wipe"] {
        let id = server.queue(kind, &device, &["--profile", "personal"]);
        let res = server.wait_result(id);
        assert_eq!(res["status"], "refused", "{kind}: {res}");
        assert_eq!(res["reason"], "not a profile this MDM manages", "{res}");
    }
    let p = profile(&hs, "personal");
    assert!(!p.locked);
    // A lock of every managed profile: work only, paused if it runs.
    let id = server.queue("lock", &device, &[]);
    let res = server.wait_result(id);
    assert_eq!(res["status"], "done", "{res}");
    assert_eq!(res["profiles"], serde_json::json!(["work"]));
    let w = profile(&hs, "work");
    assert!(w.locked);
    if can_run {
        assert_eq!(w.state, handset::ProfileState::Paused, "{w:?}");
    }
    let refused = hs.cli(&["start", "personal"]);
    if can_run {
        assert!(refused.status.success(), "{}", mdm_common::text(&refused));
        hs.ok(&["stop", "personal"]);
    }
    assert!(!profile(&hs, "personal").locked);
    // Locked by the MDM without a passcode: only the MDM unlocks it.
    let id = server.queue("unlock", &device, &[]);
    assert_eq!(server.wait_result(id)["status"], "done");
    let w = profile(&hs, "work");
    assert!(!w.locked);
    if can_run {
        assert_eq!(w.state, handset::ProfileState::Running, "{w:?}");
    }

    // Policies: applied for work, version monotonic; personal's refused.
    let push = |file: &str| {
        let r = server.admin(&["policy", "push", &device, file]).unwrap();
        r["id"].as_i64().unwrap()
    };
    let id = push(&signed_policy(tmp.path(), "work", 2));
    let res = server.wait_result(id);
    assert_eq!(
        (res["status"].as_str(), res["policy_version"].as_u64()),
        (Some("done"), Some(2)),
        "{res}"
    );
    assert!(wait_until(Duration::from_secs(60), || report()["profiles"]
        [0]["policy_version"]
        == 2));
    let id = push(&signed_policy(tmp.path(), "work", 1));
    let res = server.wait_result(id);
    assert_eq!(res["status"], "refused", "{res}");
    let id = push(&signed_policy(tmp.path(), "personal", 5));
    let res = server.wait_result(id);
    assert_eq!(res["status"], "refused", "{res}");
    let work_policy: serde_json::Value = hs
        .client()
        .call("GET", "/v1/profiles/work/policy", None::<&()>)
        .unwrap();
    assert_eq!(work_policy["policy"]["version"], 2, "{work_policy}");
    let personal_policy: serde_json::Value = hs
        .client()
        .call("GET", "/v1/profiles/personal/policy", None::<&()>)
        .unwrap();
    assert!(personal_policy["policy"].is_null(), "{personal_policy}");

    // A wipe of every managed profile: work crypto-erased, its receipt signed and sent.
    let key_file = hs.dir.join("profiles/work/disk.key");
    assert!(key_file.exists());
    let id = server.queue("wipe", &device, &[]);
    let res = server.wait_result(id);
    assert_eq!(res["status"], "done", "{res}");
    let receipt = &res["receipt"];
    assert_eq!(
        receipt["erased"],
        serde_json::json!([{"profile": "work", "crypto_erased": true}]),
        "{res}"
    );
    assert!(receipt["completed_at"].as_u64().unwrap() >= receipt["started_at"].as_u64().unwrap());
    assert!(!hs.dir.join("profiles/work").exists());
    assert_eq!(profile(&hs, "personal").name, "personal");
    assert!(wait_until(Duration::from_secs(60), || report()["profiles"]
        == serde_json::json!([])));

    // Nothing the device sent names personal or carries its kernel's hash.
    let sent: Vec<serde_json::Value> = server
        .requests()
        .into_iter()
        .filter(|r| {
            let p = r["path"].as_str().unwrap_or_default();
            p.starts_with("/v1/device/") || p == "/v1/enroll"
        })
        .collect();
    assert!(sent.iter().any(|r| r["path"] == "/v1/device/compliance"));
    assert!(sent.iter().any(|r| r["path"] == "/v1/device/results"));
    for r in &sent {
        let body = r["body"].as_str().unwrap();
        assert!(!body.contains("personal"), "{r}");
        assert!(!body.contains(&personal_hash), "{r}");
    }
    // What the device did for the MDM is in its own audit log.
    let acted = hs.audit("mdm-command");
    assert!(acted.len() >= 8, "{acted:?}");
}
on_both_stores!(commands_act_on_managed_profiles_only_and_the_personal_profile_stays_private);

fn commands_not_signed_by_the_enrolled_server_are_refused_and_change_nothing(store: Store) {
    let Setup {
        tmp,
        mut server,
        mut hs,
        device,
    } = setup(2, &store);
    // A rogue server with the same CA and device records but a command key of its own.
    server.stop();
    let rogue_dir = tmp.path().join("rogue");
    std::fs::create_dir_all(rogue_dir.join("state")).unwrap();
    for f in ["ca-key.pem", "ca.pem", "mdm.db", "mdm.db-wal"] {
        let from = server.dir.join("state").join(f);
        if from.exists() {
            std::fs::copy(from, rogue_dir.join("state").join(f)).unwrap();
        }
    }
    // On PostgreSQL the rogue reads the same database (its copy of the device records).
    store.keep_in(&rogue_dir);
    let rogue = Server::start(&rogue_dir, 0, 2);
    hs.terminate();
    hs.args = vec!["--mdm".into(), rogue.url()];
    hs.spawn();
    assert!(
        wait_until(Duration::from_secs(60), || hs.mdm_state().as_deref()
            == Some("connected")),
        "{:?}",
        hs.info().and_then(|i| i.mdm)
    );
    rogue.queue("lock", &device, &[]);
    rogue.queue("wipe", &device, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || hs
            .info()
            .and_then(|i| i.mdm)
            .is_some_and(|m| m.commands_refused == 2)),
        "{:?}",
        hs.info().and_then(|i| i.mdm)
    );
    let w = profile(&hs, "work");
    assert!(!w.locked);
    assert!(hs.dir.join("profiles/work/disk.key").exists());
    let refused = hs.audit("mdm-refused");
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(refused[0].contains("not signed"), "{refused:?}");
    assert!(hs.audit("mdm-command").is_empty());
    // No result went back for them: the rogue server holds both still pending.
    assert!(!rogue
        .requests()
        .iter()
        .any(|r| r["path"] == "/v1/device/results"));
}
on_both_stores!(commands_not_signed_by_the_enrolled_server_are_refused_and_change_nothing);

fn a_daemon_killed_during_a_policy_change_or_a_wipe_finishes_it_at_restart(store: Store) {
    let Setup {
        tmp,
        server,
        mut hs,
        device,
    } = setup(2, &store);
    let policy = hs.dir.join("profiles/work/policy.pvpol");
    // Killed after the journal entry, before the policy is applied: the old state, then the
    // new one once restarted, and the result is delivered.
    for (point, version) in [("mdm-journaled", 1u64), ("mdm-acted", 2)] {
        hs.terminate();
        hs.env = vec![("POCKETVISOR_KILL_AT".into(), point.into())];
        hs.spawn();
        let file = signed_policy(tmp.path(), "work", version);
        let r = server.admin(&["policy", "push", &device, &file]).unwrap();
        let id = r["id"].as_i64().unwrap();
        assert!(
            wait_until(Duration::from_secs(60), || hs.exited()),
            "{point}: the daemon did not die"
        );
        let in_force = policy::read_in_force(
            &policy,
            "work",
            &policy::OrgPublicKey::decode(
                &std::fs::read_to_string(tmp.path().join("org.key.pub")).unwrap(),
            )
            .unwrap(),
        )
        .unwrap()
        .map(|v| v.policy.version);
        // Either the old or the new policy, never anything between.
        let old = version.checked_sub(1).filter(|v| *v > 0);
        assert!(
            in_force == old || in_force == Some(version),
            "{point}: {in_force:?}"
        );
        if point == "mdm-journaled" {
            assert_eq!(in_force, old, "{point}");
        }
        hs.env.clear();
        hs.spawn();
        let res = server.wait_result(id);
        assert_eq!(
            (res["status"].as_str(), res["policy_version"].as_u64()),
            (Some("done"), Some(version)),
            "{point}: {res}"
        );
    }

    // Killed after the crypto-erase, before the files are deleted: the restarted daemon
    // finishes the wipe and sends the receipt.
    hs.terminate();
    hs.env = vec![("POCKETVISOR_KILL_AT".into(), "wipe-erased".into())];
    hs.spawn();
    let id = server.queue("wipe", &device, &[]);
    assert!(wait_until(Duration::from_secs(60), || hs.exited()));
    assert!(!hs.dir.join("profiles/work/disk.key").exists());
    assert!(hs
        .dir
        .join("mdm/journal")
        .join(format!("{id}.json"))
        .exists());
    hs.env.clear();
    hs.spawn();
    let res = server.wait_result(id);
    assert_eq!(res["status"], "done", "{res}");
    assert_eq!(
        res["receipt"]["erased"],
        serde_json::json!([{"profile": "work", "crypto_erased": true}]),
        "{res}"
    );
    assert!(!hs.dir.join("profiles/work").exists());
    assert!(wait_until(Duration::from_secs(30), || !hs
        .dir
        .join("mdm/journal")
        .join(format!("{id}.json"))
        .exists()));
}
on_both_stores!(a_daemon_killed_during_a_policy_change_or_a_wipe_finishes_it_at_restart);

fn a_key_lease_runs_out_offline_suspends_the_profile_and_a_fresh_one_lets_it_run(store: Store) {
    if !kvm_usable("a_key_lease_runs_out_offline") {
        return;
    }
    let Setup {
        tmp,
        mut server,
        mut hs,
        device,
    } = setup(2, &store);
    let clock = on_policy_clock(&tmp, &mut hs);
    push_policy(
        &tmp,
        &server,
        &device,
        &format!(
            "version = 1\nissued_at = {}\nprofile = \"work\"\n\n[storage]\nencrypt_at_rest = \
             true\nlease = \"60s\"\n",
            unix_now()
        ),
    );
    let lease_file = hs.dir.join("mdm/lease.json");
    assert!(wait_until(Duration::from_secs(60), || lease_file.exists()));
    assert_eq!(mode(&hs.dir.join("mdm")), 0o700);
    hs.ok(&["start", "work"]);

    // Offline, past the lease: suspended, and it does not start again.
    let port = server.port;
    server.stop();
    let lease: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&lease_file).unwrap()).unwrap();
    let until = lease["valid_until"].as_u64().unwrap();
    std::fs::write(&clock, (until + 1).to_string()).unwrap();
    suspended_and_refused(&hs, &["key lease"]);
    // A lease changed on disk is no lease.
    let mut forged = lease.clone();
    forged["valid_until"] = serde_json::json!(until + 10_000);
    std::fs::write(&lease_file, forged.to_string()).unwrap();
    assert!(!hs.cli(&["start", "work"]).status.success());
    std::fs::write(&lease_file, lease.to_string()).unwrap();

    // The MDM is back: a fresh lease (issued later, so valid past the moved clock).
    std::thread::sleep(Duration::from_secs(3));
    let _server = back_online(&hs, &server.dir, port, "valid_until", until + 1);
}
on_both_stores!(a_key_lease_runs_out_offline_suspends_the_profile_and_a_fresh_one_lets_it_run);

/// The offline limit counts from the MDM's last contact (its signed lease time), not only
/// from the policy's issue time: a device in touch with its MDM keeps running an old policy,
/// one out of touch past the limit is locked, and the next contact unlocks it.
fn an_offline_limit_runs_from_the_last_contact_with_the_mdm(store: Store) {
    if !kvm_usable("an_offline_limit_runs_from_the_last_contact") {
        return;
    }
    let Setup {
        tmp,
        mut server,
        mut hs,
        device,
    } = setup(2, &store);
    let clock = on_policy_clock(&tmp, &mut hs);
    let now = unix_now();
    // Issued an hour ago with a ten-minute limit: by its issue time alone it is locked.
    let limit = 600;
    push_policy(
        &tmp,
        &server,
        &device,
        &format!(
            "version = 1\nissued_at = {}\nprofile = \"work\"\n\n[offline]\nmax_offline_secs = \
             {limit}\n",
            now - 3600
        ),
    );

    // The link asks for a signed time of contact, and the profile runs on it.
    assert!(
        wait_until(Duration::from_secs(60), || lease_field(&hs, "issued_at")
            .is_some()),
        "{}",
        hs.log()
    );
    hs.ok(&["start", "work"]);
    assert_eq!(profile(&hs, "work").state, handset::ProfileState::Running);

    // Out of touch: the limit runs from the last contact.
    let port = server.port;
    server.stop();
    let contact = lease_field(&hs, "issued_at").unwrap();
    assert!(contact >= now, "{contact} {now}");
    let out = hs.cli(&["policy", "work", "--json"]);
    assert!(out.status.success(), "{}", mdm_common::text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["last_contact"], contact, "{status}");
    assert_eq!(status["offline_until"], contact + limit, "{status}");
    std::fs::write(&clock, (contact + limit - 5).to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(profile(&hs, "work").state, handset::ProfileState::Running);
    std::fs::write(&clock, (contact + limit + 1).to_string()).unwrap();
    suspended_and_refused(&hs, &["offline limit", "last reached this device"]);

    // The MDM is back: its next contact (later than the moved clock minus the limit)
    // unlocks the profile.
    std::fs::write(&clock, (contact + limit + 10).to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(11));
    let _server = back_online(&hs, &server.dir, port, "issued_at", contact + 10);
}
on_both_stores!(an_offline_limit_runs_from_the_last_contact_with_the_mdm);

/// A field of the signed lease the device keeps (`mdm/lease.json`); None until it has one.
fn lease_field(hs: &Handset, field: &str) -> Option<u64> {
    std::fs::read(hs.dir.join("mdm/lease.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|l| l[field].as_u64())
}

/// Waits until the profile `work` is suspended, offline (its policy's clock moved past what
/// the policy allows), and checks that starting it is refused in words holding each of `says`.
fn suspended_and_refused(hs: &Handset, says: &[&str]) {
    assert!(
        wait_until(Duration::from_secs(60), || profile(hs, "work").state
            == handset::ProfileState::Suspended),
        "{:?}\n{}",
        profile(hs, "work"),
        hs.log()
    );
    let out = hs.cli(&["start", "work"]);
    assert!(!out.status.success());
    let text = mdm_common::text(&out);
    assert!(says.iter().all(|s| text.contains(s)), "{text}");
}

/// The MDM back online: starts the server in `dir` again on `port` (where it was before it
/// stopped), waits until the device's lease `field` is past `after` (its next contact) and
/// starts the profile `work`, which runs. Returns the server.
fn back_online(hs: &Handset, dir: &std::path::Path, port: u16, field: &str, after: u64) -> Server {
    let server = Server::start(dir, port, 2);
    assert!(
        wait_until(Duration::from_secs(90), || lease_field(hs, field)
            .is_some_and(|t| t > after)),
        "{}",
        hs.log()
    );
    hs.ok(&["start", "work"]);
    assert_eq!(profile(hs, "work").state, handset::ProfileState::Running);
    server
}

/// Whether /dev/kvm can run guests here; says so loudly when not.
fn kvm_usable(test: &str) -> bool {
    let ok = std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        eprintln!("SKIP (no usable /dev/kvm): {test}");
    }
    ok
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Restarts `hs` on a policy clock the test moves (a file of unix seconds; the real clock
/// until the file is written); returns the file.
fn on_policy_clock(tmp: &tempfile::TempDir, hs: &mut Handset) -> std::path::PathBuf {
    let clock = tmp.path().join("clock");
    hs.terminate();
    hs.env = vec![(
        "POCKETVISOR_POLICY_CLOCK".into(),
        clock.display().to_string(),
    )];
    hs.spawn();
    clock
}

/// Signs the policy `toml` with the test's organisation key and has the MDM push it to
/// `device`; the device reports it applied.
fn push_policy(tmp: &tempfile::TempDir, server: &Server, device: &str, toml: &str) {
    let doc = tmp.path().join("policy.toml");
    std::fs::write(&doc, toml).unwrap();
    let signed = tmp.path().join("policy.pvpol");
    let out = std::process::Command::new(mdm_common::BIN)
        .args(["policy", "sign", "--key"])
        .arg(tmp.path().join("org.key"))
        .arg(&doc)
        .arg("-o")
        .arg(&signed)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", mdm_common::text(&out));
    let r = server
        .admin(&["policy", "push", device, signed.to_str().unwrap()])
        .unwrap();
    let res = server.wait_result(r["id"].as_i64().unwrap());
    assert_eq!(res["status"], "done", "{res}");
}
