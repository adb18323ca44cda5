//! Signed IT policies through the `pocketvisor` CLI and the daemon: keys, signing, trust,
//! applying (refusals change nothing, exit 4), `profile policy`, and a profile whose kernel
//! the policy does not allow refused at start (403, exit 4) until a policy allows it.
//! Needs `cargo build -p pocketvisor`; the boot test needs /dev/kvm and the probe guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{can_run_vms, pv_bin, Daemon};
use handset::ProfileSpec;

fn pv(args: &[&str]) -> Output {
    Command::new(pv_bin()).args(args).output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The exit code and stderr of a command that must fail.
fn fails(out: &Output) -> (i32, String) {
    assert!(!out.status.success(), "succeeded: {:?}", out);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn now() -> u64 {
    policy::unix_now()
}

/// Writes a policy document for `work` and signs it with `key` into `<tmp>/<tag>.pvpol`.
fn signed(tmp: &Path, key: &Path, tag: &str, version: u64, extra: &str) -> PathBuf {
    signed_at(tmp, key, tag, version, now() - 60, extra)
}

/// [`signed`] issued at `issued_at` (unix seconds).
fn signed_at(
    tmp: &Path,
    key: &Path,
    tag: &str,
    version: u64,
    issued_at: u64,
    extra: &str,
) -> PathBuf {
    let doc = tmp.join(format!("{tag}.toml"));
    std::fs::write(
        &doc,
        format!("version = {version}\nissued_at = {issued_at}\nprofile = \"work\"\n{extra}"),
    )
    .unwrap();
    let out = tmp.join(format!("{tag}.pvpol"));
    ok(&pv(&[
        "policy",
        "sign",
        "--key",
        s(key),
        s(&doc),
        "-o",
        s(&out),
    ]));
    out
}

#[test]
fn cli_signs_verifies_trusts_applies_and_refuses_bad_policies() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let state = t.join("state");
    // A profile on disk, as the daemon creates it (no daemon needed for these commands).
    std::fs::create_dir_all(state.join("profiles/work")).unwrap();
    let spec =
        ProfileSpec::from_template("work", "work", handset::spec::TemplateBoot::Probe).unwrap();
    std::fs::write(
        state.join("profiles/work/profile.toml"),
        spec.to_toml().unwrap(),
    )
    .unwrap();

    let key = t.join("org.key");
    let public = ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    assert!(public.starts_with("pvpol-public-"), "{public}");
    let pub_file = t.join("org.key.pub");
    assert_eq!(std::fs::read_to_string(&pub_file).unwrap(), public);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    // Never overwritten.
    assert_eq!(fails(&pv(&["policy", "keygen", "-o", s(&key)])).0, 1);

    let v2 = signed(t, &key, "v2", 2, "[screen]\ncapture = false\n");
    let out = ok(&pv(&[
        "policy",
        "verify",
        "--org-key",
        s(&pub_file),
        s(&v2),
    ]));
    assert!(
        out.contains("valid: version 2 for profile \"work\""),
        "{out}"
    );
    let out = ok(&pv(&["policy", "show", "--org-key", public.trim(), s(&v2)]));
    assert!(out.contains("capture = false"), "{out}");

    // Nothing is applied before the handset trusts a key.
    let (code, err) = fails(&pv(&["policy", "apply", "--state-dir", s(&state), s(&v2)]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("trusts no organisation key"), "{err}");
    ok(&pv(&[
        "policy",
        "trust",
        "--state-dir",
        s(&state),
        s(&pub_file),
    ]));
    let other = t.join("other.key");
    ok(&pv(&["policy", "keygen", "-o", s(&other)]));
    let (_, err) = fails(&pv(&[
        "policy",
        "trust",
        "--state-dir",
        s(&state),
        &format!("{}.pub", s(&other)),
    ]));
    assert!(err.contains("--replace"), "{err}");

    let out = ok(&pv(&[
        "profile",
        "--state-dir",
        s(&state),
        "policy",
        "work",
    ]));
    assert!(out.contains("no IT policy in force"), "{out}");
    let out = ok(&pv(&["policy", "apply", "--state-dir", s(&state), s(&v2)]));
    assert!(
        out.contains("version 2 for profile \"work\": applied"),
        "{out}"
    );
    let in_force = state.join("profiles/work/policy.pvpol");
    let applied = std::fs::read(&in_force).unwrap();
    assert_eq!(applied, std::fs::read(&v2).unwrap());

    // Refused, exit 4, the policy in force byte for byte unchanged.
    let v1 = signed(t, &key, "v1", 1, "");
    let v3_other_key = signed(t, &other, "v3o", 3, "");
    let expired = signed(t, &key, "v3e", 3, &format!("expires_at = {}\n", now() - 1));
    let unsigned = t.join("v3.toml");
    std::fs::write(
        &unsigned,
        "version = 3\nissued_at = 1\nprofile = \"work\"\n",
    )
    .unwrap();
    let v3 = signed(t, &key, "v3", 3, "[screen]\ncapture = false\n");
    let tampered = t.join("tampered.pvpol");
    let text = std::fs::read_to_string(&v3).unwrap();
    std::fs::write(
        &tampered,
        text.replace("capture = false", "capture = true "),
    )
    .unwrap();
    for (file, why) in [
        (&v1, "no rollback"),
        (&v2, "already in force"),
        (&v3_other_key, "does not verify"),
        (&expired, "expired"),
        (&unsigned, "not a signed policy"),
        (&tampered, "does not verify"),
    ] {
        let out = pv(&["policy", "apply", "--state-dir", s(&state), s(file)]);
        if why == "already in force" {
            assert!(ok(&out).contains(why));
        } else {
            let (code, err) = fails(&out);
            assert_eq!(code, 4, "{}: {err}", file.display());
            assert!(err.contains(why), "{}: {err}", file.display());
        }
        assert_eq!(
            std::fs::read(&in_force).unwrap(),
            applied,
            "{}",
            file.display()
        );
    }
    let (code, _) = fails(&pv(&[
        "policy",
        "verify",
        "--org-key",
        s(&pub_file),
        s(&tampered),
    ]));
    assert_eq!(code, 4);

    let out = ok(&pv(&[
        "profile",
        "--state-dir",
        s(&state),
        "--json",
        "policy",
        "work",
    ]));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"]["version"], 2);
    assert_eq!(v["policy"]["screen"]["capture"], false);
    let (code, _) = fails(&pv(&[
        "profile",
        "--state-dir",
        s(&state),
        "policy",
        "nope",
    ]));
    assert_eq!(code, 3);
}

#[test]
fn a_profile_boots_only_a_kernel_its_policy_allows() {
    if !can_run_vms("a_profile_boots_only_a_kernel_its_policy_allows") {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let key = k.join("org.key");
    ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    let pub_file = k.join("org.key.pub");
    let d = Daemon::start_with("policy-boot", &["--org-key", s(&pub_file)]);
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    let Some(probe) = info.probe else {
        common::loud(
            "SKIP (probe guest not built): a_profile_boots_only_a_kernel_its_policy_allows",
        );
        return;
    };
    let probe_sha = handset::org_policy::sha256_file(Path::new(&probe)).unwrap();
    d.create_probe("work", 64, "");
    let state = d.dir.to_str().unwrap();

    let other = "0".repeat(64);
    let v1 = signed(
        k,
        &key,
        "v1",
        1,
        &format!("[boot]\nkernels = [\"{other}\"]\n"),
    );
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v1)]));
    let (code, err) = fails(&d.cli(&["start", "work"]));
    assert_eq!(code, 4, "{err}");
    assert!(
        err.contains("may not start") && err.contains(&probe_sha),
        "{err}"
    );
    assert_eq!(d.show("work").state.as_str(), "stopped");
    assert!(!d.dir.join("profiles/work/run/api.sock").exists());

    let v2 = signed(
        k,
        &key,
        "v2",
        2,
        &format!("[boot]\nkernels = [\"{probe_sha}\"]\nmin_pocketvisor = \"0.0.1\"\n"),
    );
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v2)]));
    ok(&d.cli(&["start", "work"]));
    assert_eq!(d.show("work").state.as_str(), "running");
    ok(&d.cli(&["stop", "work"]));

    // A build older than the policy's minimum does not start either.
    let v3 = signed(k, &key, "v3", 3, "[boot]\nmin_pocketvisor = \"999.0.0\"\n");
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v3)]));
    let (code, err) = fails(&d.cli(&["start", "work"]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("requires pocketvisor 999.0.0"), "{err}");
}

/// The audit records of `action`, oldest first, as `profile: detail`.
fn audit_lines(d: &Daemon, action: &str) -> Vec<String> {
    let all: Vec<handset::Event> = d
        .client()
        .call("GET", "/v1/audit?limit=1000", None::<&()>)
        .unwrap();
    all.into_iter()
        .filter(|e| e.event == action)
        .map(|e| format!("{}: {}", e.profile, e.detail))
        .collect()
}

#[test]
fn policies_change_through_the_daemon_and_every_attempt_is_audited() {
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let key = k.join("org.key");
    ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    let pub_file = k.join("org.key.pub");
    let d = Daemon::start_with("policy-api", &["--org-key", s(&pub_file)]);
    // A profile with a screen (it need not run: capture is refused before its state matters).
    let spec = ProfileSpec::from_toml(
        "name = \"work\"\nkernel = \"probe\"\nmemory_mib = 64\nscreen = true\n",
    )
    .unwrap();
    let req = handset::CreateProfile {
        spec: Some(spec),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    let state = d.dir.to_str().unwrap();

    let v1 = signed(k, &key, "v1", 1, "");
    let v2 = signed(k, &key, "v2", 2, "[screen]\ncapture = false\n");
    let out = pv(&["policy", "apply", "--state-dir", state, s(&v2)]);
    assert!(ok(&out).contains("version 2 for profile \"work\": applied"));
    // Through the daemon, not the offline path.
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("not running"), "{err}");
    let (code, err) = fails(&pv(&["policy", "apply", "--state-dir", state, s(&v1)]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no rollback"), "{err}");
    let other = k.join("other.key");
    ok(&pv(&["policy", "keygen", "-o", s(&other)]));
    let forged = signed(k, &other, "v9", 9, "");
    let (code, _) = fails(&pv(&["policy", "apply", "--state-dir", state, s(&forged)]));
    assert_eq!(code, 4);
    let garbage = k.join("garbage.pvpol");
    std::fs::write(&garbage, b"\xff\xfe not a policy").unwrap();
    let (code, _) = fails(&pv(&["policy", "apply", "--state-dir", state, s(&garbage)]));
    assert_eq!(code, 4);
    assert_eq!(
        std::fs::read(d.dir.join("profiles/work/policy.pvpol")).unwrap(),
        std::fs::read(&v2).unwrap()
    );

    let audit = audit_lines(&d, "policy-apply");
    assert_eq!(audit.len(), 4, "{audit:#?}");
    assert!(
        audit[0].starts_with("work: uid ") && audit[0].ends_with(": applied version 2"),
        "{audit:#?}"
    );
    assert!(
        audit[1].starts_with("work: ") && audit[1].contains("refused: policy version 1 refused"),
        "{audit:#?}"
    );
    // Not verified: recorded under `-`, not under the name the forged policy claims.
    assert!(
        audit[2].starts_with("-: ") && audit[2].contains("refused: policy signature"),
        "{audit:#?}"
    );
    assert!(audit[3].starts_with("-: ") && audit[3].contains("refused"));

    // What is in force, from the daemon: the screen rules the display reads.
    let out = ok(&d.cli(&["--json", "policy", "work"]));
    let st: handset::org_policy::PolicyStatus = serde_json::from_str(&out).unwrap();
    assert_eq!(st.policy.as_ref().map(|p| p.version), Some(2));
    assert!(!st.screen.capture && st.screen.remote_view);
    assert!(!st.expired);
    let err = d
        .client()
        .call::<serde_json::Value>("GET", "/v1/profiles/work/screenshot", None::<&()>)
        .unwrap_err();
    assert!(
        matches!(&err, handset::client::ClientError::Api { status: 403, message } if message.contains("capture")),
        "{err}"
    );
    assert_eq!(audit_lines(&d, "screenshot").len(), 1);
    let v3 = signed(k, &key, "v3", 3, "");
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v3)]));
    let err = d
        .client()
        .call::<serde_json::Value>("GET", "/v1/profiles/work/screenshot", None::<&()>)
        .unwrap_err();
    // Allowed now: refused only because the profile does not run.
    assert!(
        matches!(&err, handset::client::ClientError::Api { status: 409, .. }),
        "{err}"
    );
    let audit = audit_lines(&d, "policy-apply");
    assert!(
        audit[4].ends_with("applied version 3 (replaces 2)"),
        "{audit:#?}"
    );
}

#[test]
fn with_no_daemon_a_policy_is_applied_under_its_lock_and_audited_in_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let state = t.join("state");
    std::fs::create_dir_all(state.join("profiles/work")).unwrap();
    let spec =
        ProfileSpec::from_template("work", "work", handset::spec::TemplateBoot::Probe).unwrap();
    std::fs::write(
        state.join("profiles/work/profile.toml"),
        spec.to_toml().unwrap(),
    )
    .unwrap();
    let key = t.join("org.key");
    ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    ok(&pv(&[
        "policy",
        "trust",
        "--state-dir",
        s(&state),
        &format!("{}.pub", s(&key)),
    ]));
    let v1 = signed(t, &key, "v1", 1, "");
    let out = pv(&["policy", "apply", "--state-dir", s(&state), s(&v1)]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("daemon is not running"), "{err}");
    let again = ok(&pv(&["policy", "apply", "--state-dir", s(&state), s(&v1)]));
    assert!(again.contains("already in force"), "{again}");
    let db = handset::db::Db::open(&state.join("handset.db")).unwrap();
    let records = db.records(handset::db::Log::Audit, None, 100).unwrap();
    let details: Vec<_> = records
        .iter()
        .filter(|e| e.event == "policy-apply")
        .map(|e| format!("{}: {}", e.profile, e.detail))
        .collect();
    assert_eq!(details.len(), 2, "{details:#?}");
    assert!(
        details[0].starts_with("work: offline (no daemon)")
            && details[0].ends_with("applied version 1"),
        "{details:#?}"
    );
    assert!(
        details[1].ends_with("version 1 already in force"),
        "{details:#?}"
    );

    // While a daemon holds the state directory's lock, the offline path is refused.
    let dir = handset::StateDir::new(&state).unwrap();
    let lock = std::fs::File::create(dir.lock_file()).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file we own.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let v2 = signed(t, &key, "v2", 2, "");
    let err =
        handset::org_policy::apply_offline(&dir, &std::fs::read(&v2).unwrap(), now()).unwrap_err();
    assert!(err.to_string().contains("does not answer"), "{err}");
    drop(lock);
    assert_eq!(
        std::fs::read(state.join("profiles/work/policy.pvpol")).unwrap(),
        std::fs::read(&v1).unwrap()
    );
}

/// An Ethernet frame from the guest (10.0.0.2:4000) to UDP `dst`:`port`, as the hex
/// `pv.net.frames=` takes.
fn udp_frame_hex(dst: [u8; 4], port: u16) -> String {
    let payload = b" refused? ";
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0x50, 0x56, 0, 0, 0x21, 0x08, 0x00]);
    let total = u16::try_from(28 + payload.len()).unwrap();
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 2]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&port.to_be_bytes());
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(payload);
    f.iter().map(|b| format!("{b:02x}")).collect()
}

/// The `network-drop` audit details of `work` whose rule is `rule`.
fn drop_records(d: &Daemon, rule: &str) -> Vec<String> {
    audit_lines(d, "network-drop")
        .into_iter()
        .filter_map(|l| l.strip_prefix("work: ").map(str::to_string))
        .filter(|l| l.starts_with(&format!("{rule}: ")))
        .collect()
}

#[test]
fn frames_the_policy_refuses_reach_the_audit_log_counted_per_rule() {
    const TEST: &str = "frames_the_policy_refuses_reach_the_audit_log_counted_per_rule";
    if !can_run_vms(TEST) {
        return;
    }
    if !Path::new("/dev/net/tun").exists() {
        common::loud(&format!("SKIP (no /dev/net/tun): {TEST}"));
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let key = k.join("org.key");
    ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    let pub_file = k.join("org.key.pub");
    // First a daemon that audits only every hour: what a stop finds is recorded then.
    let mut d = Daemon::start_with(
        "policy-drops",
        &["--org-key", s(&pub_file), "--drop-audit-secs", "3600"],
    );
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    if info.probe.is_none() {
        common::loud(&format!("SKIP (probe guest not built): {TEST}"));
        return;
    }
    // The guest sends one allowed frame, 25 that rule 2 refuses, and one only the default
    // refuses (its self-test frame, of its own ethertype, also falls to the default).
    let mut frames = vec![udp_frame_hex([10, 0, 0, 1], 7000)];
    frames.extend((0..25).map(|i| udp_frame_hex([10, 0, 0, 9], 5000 + i)));
    frames.push(udp_frame_hex([10, 0, 0, 9], 9));
    let cmdline = format!(
        "pv.tests=net pv.net.wait=1 pv.net.listen=600000 pv.net.frames={}",
        frames.join(",")
    );
    let spec = format!(
        "name = \"work\"\nkernel = \"probe\"\ncmdline = \"{cmdline}\"\nmemory_mib = 64\n\
         net = \"pvdrop0\"\n"
    );
    let req = handset::CreateProfile {
        spec: Some(ProfileSpec::from_toml(&spec).unwrap()),
        ..Default::default()
    };
    let _: handset::ProfileInfo = d.client().call("POST", "/v1/profiles", Some(&req)).unwrap();
    let v1 = signed(
        k,
        &key,
        "v1",
        1,
        "[network]\ndefault = \"deny\"\nrules = [\n\
         { action = \"allow\", cidr = \"10.0.0.1/32\", protocol = \"udp\", ports = \"7000\" },\n\
         { action = \"deny\", protocol = \"udp\", ports = \"5000-6000\" },\n]\n",
    );
    ok(&pv(&["policy", "apply", "--state-dir", s(&d.dir), s(&v1)]));
    let rule2 = "rule 2 (deny udp ports 5000-6000)";
    let sent = |d: &Daemon| {
        common::wait_until(std::time::Duration::from_secs(60), || {
            d.serial("work").contains("net frames sent=27")
        })
    };

    ok(&d.cli(&["start", "work"]));
    assert!(sent(&d), "the guest did not send: {}", d.serial("work"));
    assert!(
        drop_records(&d, rule2).is_empty(),
        "audited before the interval"
    );
    ok(&d.cli(&["stop", "work"]));
    let first = drop_records(&d, rule2);
    assert_eq!(first.len(), 1, "{first:?}");
    assert!(
        first[0].contains("25 frames refused in 3600 s (25 from the guest, 0 to it)")
            && first[0].ends_with("last: out udp 10.0.0.2:4000 -> 10.0.0.9:5024"),
        "{first:?}"
    );
    let default = drop_records(&d, "default (deny)");
    assert_eq!(default.len(), 1, "{default:?}");
    assert!(
        default[0].contains("from the guest") && !default[0].contains(" 0 from the guest"),
        "{default:?}"
    );
    assert!(
        drop_records(&d, "rule 1 (allow udp 10.0.0.1/32 port 7000)").is_empty(),
        "an allowed frame was audited as refused"
    );
    assert!(d.events("work").iter().any(|e| e == "network-drops"));
    let shown = ok(&d.cli(&["audit"]));
    assert!(
        shown.contains("network-drop") && shown.contains(rule2),
        "{shown}"
    );

    // Every second now: the refusals of a running guest arrive without a stop, once.
    d.terminate();
    d.extra_args = vec!["--drop-audit-secs".into(), "1".into()];
    d.spawn();
    ok(&d.cli(&["start", "work"]));
    assert!(sent(&d), "the guest did not send: {}", d.serial("work"));
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || drop_records(
            &d, rule2
        )
        .len()
            == 2),
        "{:?}",
        drop_records(&d, rule2)
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    ok(&d.cli(&["stop", "work"]));
    let all = drop_records(&d, rule2);
    assert_eq!(all.len(), 2, "the same refusals audited twice: {all:?}");
    assert!(all[1].contains("25 frames refused in 1 s"), "{all:?}");
}

#[test]
fn a_profile_whose_policy_was_not_refreshed_within_its_offline_limit_is_locked() {
    const TEST: &str =
        "a_profile_whose_policy_was_not_refreshed_within_its_offline_limit_is_locked";
    if !can_run_vms(TEST) {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let k = keys.path();
    let key = k.join("org.key");
    ok(&pv(&["policy", "keygen", "-o", s(&key)]));
    let pub_file = k.join("org.key.pub");
    let d = Daemon::start_with("policy-offline", &["--org-key", s(&pub_file)]);
    let info: handset::DaemonInfo = d.client().call("GET", "/v1/handset", None::<&()>).unwrap();
    if info.probe.is_none() {
        common::loud(&format!("SKIP (probe guest not built): {TEST}"));
        return;
    }
    d.create_probe("work", 64, "");
    let state = s(&d.dir);
    // Issued an hour ago, with an hour and 20 s offline: it locks within about 20 s.
    let limit = 3600 + 20;
    let issued = now() - 3600;
    let v1 = signed_at(
        k,
        &key,
        "v1",
        1,
        issued,
        &format!("[offline]\nmax_offline_secs = {limit}\n"),
    );
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v1)]));
    ok(&d.cli(&["start", "work"]));
    assert!(
        common::wait_until(std::time::Duration::from_secs(120), || d
            .show("work")
            .state
            .as_str()
            == "suspended"),
        "not locked: {:?}\n{}",
        d.show("work"),
        d.log()
    );
    // Not before its time.
    assert!(
        now() >= issued + limit,
        "locked at {} before {}",
        now(),
        issued + limit
    );
    let locks = audit_lines(&d, "policy-lock");
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert!(
        locks[0].starts_with("work: suspended: ") && locks[0].contains("offline limit"),
        "{locks:?}"
    );
    // Locked: it does not resume, nor start afresh, until a newer policy comes.
    let (code, err) = fails(&d.cli(&["resume", "work"]));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("offline limit"), "{err}");
    assert_eq!(d.show("work").state.as_str(), "suspended");
    let v2 = signed(
        k,
        &key,
        "v2",
        2,
        &format!("[offline]\nmax_offline_secs = {limit}\n"),
    );
    ok(&pv(&["policy", "apply", "--state-dir", state, s(&v2)]));
    ok(&d.cli(&["resume", "work"]));
    assert_eq!(d.show("work").state.as_str(), "running");
    // The guest goes on where it was locked.
    let before = common::last_counter(&d.serial("work"));
    assert!(before.is_some(), "{}", d.serial("work"));
    assert!(common::wait_until(
        std::time::Duration::from_secs(30),
        || { common::last_counter(&d.serial("work")) > before }
    ));
    ok(&d.cli(&["stop", "work"]));
}
