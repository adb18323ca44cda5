//! The device side: enrollment kept on disk (once), commands verified before use.

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use mdm::device::Enrollment;
use mdm::protocol::SignedCommand;
use mdm::server::{Mdm, TlsListener};
use mdm::{SqliteStore, Store};

#[tokio::test]
async fn a_device_enrolls_once_and_acts_only_on_signed_commands() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::in_memory().unwrap());
    let mdm = Mdm::new(
        &dir.path().join("server"),
        store.clone(),
        "admin",
        Duration::from_secs(10),
    )
    .unwrap();
    let config = mdm.tls_config(&["localhost".to_string()]).unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let ca_pem = mdm.ca_pem().to_owned();
    tokio::spawn(mdm::server::serve(
        mdm,
        TlsListener::new(tcp, config).unwrap(),
        std::future::pending(),
    ));
    store.add_token("tok", i64::MAX).unwrap();

    let state = dir.path().join("device");
    let e = Enrollment::enroll_once(&state, addr, "localhost", &ca_pem, "tok")
        .await
        .unwrap();
    for f in ["device-key.pk8", "enrollment.json"] {
        assert_eq!(
            std::fs::metadata(state.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600,
            "{f}"
        );
    }
    // Again: the kept enrollment is loaded, the (now used) token is not sent.
    let again = Enrollment::enroll_once(&state, addr, "localhost", &ca_pem, "tok")
        .await
        .unwrap();
    assert_eq!(again.enrolled.device_id, e.enrolled.device_id);
    assert_eq!(store.devices().unwrap().len(), 1);

    let id = store.enqueue(&e.enrolled.device_id, "lock", "", 0).unwrap();
    let polled = again.poll(0).await.unwrap();
    assert_eq!((polled.commands.len(), polled.refused.len()), (1, 0));
    assert_eq!(polled.commands[0].id, id);
    again.report(id, "locked").await.unwrap();
    assert!(again.poll(0).await.unwrap().commands.is_empty());

    // Commands the server did not sign for this device are refused.
    let good = polled.commands[0].clone();
    let forged = SignedCommand {
        kind: "wipe".into(),
        ..good.clone()
    };
    let unsigned = SignedCommand {
        signature: String::new(),
        ..good.clone()
    };
    let elsewhere = SignedCommand {
        device_id: "another".into(),
        ..good.clone()
    };
    let v = again.verified(vec![forged, unsigned, elsewhere, good]);
    assert_eq!((v.commands.len(), v.refused.len()), (1, 3));
}
