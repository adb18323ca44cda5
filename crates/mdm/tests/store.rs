//! The SQLite store: tokens work once and expire, command queues are per device, the schema
//! survives reopening.

use mdm::{Device, SqliteStore, Store, StoreError};

fn device(id: &str, fp: &str) -> Device {
    Device {
        public_key: String::new(),
        id: id.into(),
        cert_sha256: fp.into(),
        enrolled_at: 100,
        revoked: false,
    }
}

#[test]
fn a_token_works_once_before_expiry() {
    let s = SqliteStore::in_memory().unwrap();
    s.add_token("tok-a", 1000).unwrap();
    s.add_token("tok-b", 1000).unwrap();
    s.redeem_token("tok-a", 999).unwrap();
    assert!(
        matches!(s.redeem_token("tok-a", 999), Err(StoreError::TokenRefused)),
        "reuse"
    );
    assert!(
        matches!(s.redeem_token("tok-b", 1000), Err(StoreError::TokenRefused)),
        "expired"
    );
    assert!(
        matches!(s.redeem_token("nope", 1), Err(StoreError::TokenRefused)),
        "unknown"
    );
}

#[test]
fn the_token_itself_is_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mdm.db");
    let s = SqliteStore::open(&path).unwrap();
    s.add_token("secret-enroll-token-XYZ", 1000).unwrap();
    drop(s);
    let mut bytes = std::fs::read(&path).unwrap();
    if let Ok(wal) = std::fs::read(dir.path().join("mdm.db-wal")) {
        bytes.extend(wal);
    }
    let needle = b"secret-enroll-token-XYZ";
    assert!(!bytes.windows(needle.len()).any(|w| w == needle));
}

#[test]
fn devices_are_found_by_certificate_and_can_be_revoked() {
    let s = SqliteStore::in_memory().unwrap();
    s.add_device(&device("d1", "aa")).unwrap();
    s.add_device(&device("d2", "bb")).unwrap();
    assert!(matches!(
        s.add_device(&device("d3", "aa")),
        Err(StoreError::Duplicate)
    ));
    assert_eq!(s.device_by_cert("bb").unwrap().unwrap().id, "d2");
    assert!(s.device_by_cert("cc").unwrap().is_none());
    s.revoke("d1").unwrap();
    assert!(s.device_by_cert("aa").unwrap().unwrap().revoked);
    assert!(matches!(s.revoke("zz"), Err(StoreError::UnknownDevice(_))));
    let ids: Vec<_> = s.devices().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["d1", "d2"]);
}

#[test]
fn commands_queue_per_device_and_only_their_device_completes_them() {
    let s = SqliteStore::in_memory().unwrap();
    s.add_device(&device("d1", "aa")).unwrap();
    s.add_device(&device("d2", "bb")).unwrap();
    let c1 = s.enqueue("d1", "lock", "{}", 5).unwrap();
    let c2 = s.enqueue("d1", "wipe", "{}", 6).unwrap();
    let c3 = s.enqueue("d2", "unlock", "{}", 7).unwrap();
    assert!(matches!(
        s.enqueue("ghost", "lock", "{}", 7),
        Err(StoreError::UnknownDevice(_))
    ));
    let d1: Vec<_> = s
        .pending("d1")
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.kind))
        .collect();
    assert_eq!(d1, [(c1, "lock".to_string()), (c2, "wipe".to_string())]);
    // d2 cannot complete d1's command; d1 can, once.
    assert!(matches!(
        s.complete("d2", c1, "ok", 8),
        Err(StoreError::UnknownCommand(_))
    ));
    s.complete("d1", c1, "ok", 8).unwrap();
    assert!(matches!(
        s.complete("d1", c1, "ok", 9),
        Err(StoreError::UnknownCommand(_))
    ));
    assert_eq!(s.pending("d1").unwrap().len(), 1);
    assert_eq!(s.pending("d2").unwrap()[0].id, c3);
}

#[test]
fn audit_compliance_and_policies_are_kept_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mdm.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        s.add_device(&device("d1", "aa")).unwrap();
        s.audit("admin", "lock", "d1", 10).unwrap();
        s.record_policy("d1", 3, "{\"v\":3}", 11).unwrap();
        s.add_compliance("d1", "{\"policy_version\":2}", 12)
            .unwrap();
        s.add_compliance("d1", "{\"policy_version\":3}", 13)
            .unwrap();
        assert!(matches!(
            s.add_compliance("x", "{}", 1),
            Err(StoreError::UnknownDevice(_))
        ));
    }
    let s = SqliteStore::open(&path).unwrap();
    let log = s.audit_log().unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (log[0].actor.as_str(), log[0].action.as_str()),
        ("admin", "lock")
    );
    assert_eq!(
        s.latest_compliance("d1").unwrap().unwrap(),
        "{\"policy_version\":3}"
    );
    assert!(s.latest_compliance("d2").unwrap().is_none());
}
