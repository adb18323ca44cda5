//! The store, SQLite and PostgreSQL alike: tokens work once and expire (also when two
//! enrollments race), command queues are per device, the token itself never reaches the disk,
//! the data and schema survive reopening.

mod support;

use std::sync::{Arc, Barrier};

use mdm::{Device, StoreError};
use support::Backend;

fn device(id: &str, fp: &str) -> Device {
    Device {
        public_key: String::new(),
        id: id.into(),
        cert_sha256: fp.into(),
        enrolled_at: 100,
        revoked: false,
    }
}

fn a_token_works_once_before_expiry(b: Backend) {
    let s = b.open();
    s.add_token("tok-a", 1000).unwrap();
    s.add_token("tok-b", 1000).unwrap();
    assert!(
        matches!(s.add_token("tok-a", 2000), Err(StoreError::Duplicate)),
        "a token is added once"
    );
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
on_both_stores!(sync a_token_works_once_before_expiry);

/// Eight threads redeem each of 20 tokens at the same moment: each token is redeemed exactly
/// once, every other attempt is refused.
fn racing_redemptions_of_one_token_have_one_winner(b: Backend) {
    const THREADS: usize = 8;
    const TOKENS: usize = 20;
    let s = b.open();
    for t in 0..TOKENS {
        s.add_token(&format!("race-{t}"), 1000).unwrap();
    }
    let barrier = Arc::new(Barrier::new(THREADS));
    let racers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut won = Vec::new();
                for t in 0..TOKENS {
                    barrier.wait();
                    match s.redeem_token(&format!("race-{t}"), 500) {
                        Ok(()) => won.push(t),
                        Err(StoreError::TokenRefused) => {}
                        Err(e) => panic!("token {t}: {e}"),
                    }
                }
                won
            })
        })
        .collect();
    let mut wins = [0usize; TOKENS];
    for r in racers {
        for t in r.join().unwrap() {
            wins[t] += 1;
        }
    }
    assert_eq!(wins, [1; TOKENS], "winners per token");
}
on_both_stores!(sync racing_redemptions_of_one_token_have_one_winner);

/// Only the token's hash is kept: the hash is found among the store's bytes on disk (so the
/// search sees the data), the token is not.
fn the_token_itself_is_not_stored(b: Backend) {
    let token = "secret-enroll-token-XYZ";
    let s = b.open();
    s.add_token(token, 1000).unwrap();
    drop(s);
    let bytes = b.bytes_on_disk();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(contains(mdm::store::token_hash(token).as_bytes()));
    assert!(!contains(token.as_bytes()));
}
on_both_stores!(sync the_token_itself_is_not_stored);

fn devices_are_found_by_certificate_and_can_be_revoked(b: Backend) {
    let s = b.open();
    s.add_device(&device("d1", "aa")).unwrap();
    s.add_device(&device("d2", "bb")).unwrap();
    assert!(matches!(
        s.add_device(&device("d3", "aa")),
        Err(StoreError::Duplicate)
    ));
    assert!(matches!(
        s.add_device(&device("d1", "cc")),
        Err(StoreError::Duplicate)
    ));
    assert_eq!(s.device_by_cert("bb").unwrap().unwrap().id, "d2");
    assert!(s.device_by_cert("cc").unwrap().is_none());
    s.revoke("d1").unwrap();
    assert!(s.device_by_cert("aa").unwrap().unwrap().revoked);
    assert!(!s.device_by_cert("bb").unwrap().unwrap().revoked);
    assert!(matches!(s.revoke("zz"), Err(StoreError::UnknownDevice(_))));
    let ids: Vec<_> = s.devices().unwrap().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["d1", "d2"]);
}
on_both_stores!(sync devices_are_found_by_certificate_and_can_be_revoked);

fn commands_queue_per_device_and_only_their_device_completes_them(b: Backend) {
    let s = b.open();
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
on_both_stores!(sync commands_queue_per_device_and_only_their_device_completes_them);

fn audit_compliance_and_policies_are_kept_across_reopen(b: Backend) {
    {
        let s = b.open();
        s.add_device(&device("d1", "aa")).unwrap();
        s.audit("admin", "lock", "d1", 10).unwrap();
        s.record_policy("d1", 3, "{\"v\":3}", 11).unwrap();
        assert!(matches!(
            s.record_policy("x", 3, "{}", 11),
            Err(StoreError::UnknownDevice(_))
        ));
        s.add_compliance("d1", "{\"policy_version\":2}", 12)
            .unwrap();
        s.add_compliance("d1", "{\"policy_version\":3}", 13)
            .unwrap();
        assert!(matches!(
            s.add_compliance("x", "{}", 1),
            Err(StoreError::UnknownDevice(_))
        ));
    }
    // Reopening applies no migration twice and finds everything.
    let s = b.open();
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
    assert_eq!(s.devices().unwrap().len(), 1);
}
on_both_stores!(sync audit_compliance_and_policies_are_kept_across_reopen);
