//! The handset's side of the MDM, with real processes: `pocketvisor mdm serve` and
//! `pocketvisor handset --mdm URL --enroll TOKEN --mdm-ca ca.pem`.

mod mdm_common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use mdm_common::{wait_until, Handset, Server};

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn a_handset_enrolls_once_works_offline_and_reconnects() {
    let tmp = tempfile::tempdir().unwrap();
    let srv_dir = tmp.path().join("mdm");
    std::fs::create_dir(&srv_dir).unwrap();
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
