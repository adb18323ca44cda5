//! The same behaviour of both stores: the twin directory's files and object_store's
//! local-file backend.

use std::io::{Read, Write};
use std::path::Path;

use super::*;

const A: &str = "0123456789abcdef0123456789abcdef";
const B: &str = "fedcba9876543210fedcba9876543210";

fn device(n: u8) -> DeviceId {
    DeviceId::of_certificate(&[n])
}

/// Both stores, each over a scratch directory (twin directory, object store root).
fn stores(dir: &Path) -> Vec<(&'static str, ReplicaStore, std::path::PathBuf)> {
    let twin = dir.join("twin");
    let objects = dir.join("objects");
    std::fs::create_dir_all(&twin).unwrap();
    std::fs::create_dir_all(&objects).unwrap();
    let url = format!("file://{}", objects.display());
    vec![
        ("twin dir", ReplicaStore::TwinDirs, twin.clone()),
        ("object store", ReplicaStore::from_url(&url).unwrap(), twin),
    ]
}

fn store(r: &dyn Replica, chain: &str, seq: u64, data: &[u8]) -> Result<(), ReplicaError> {
    let mut i = r.begin(chain, seq)?;
    i.write_all(data)?;
    i.commit()
}

fn contents(r: &dyn Replica) -> (String, Vec<Vec<u8>>) {
    let (c, files) = r.open_chain().unwrap().unwrap();
    let data = files
        .into_iter()
        .map(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).unwrap();
            v
        })
        .collect();
    (c, data)
}

/// Every file under `dir`, relative.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_chain_grows_in_order_and_a_new_full_one_replaces_it_once_whole() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, s, twin) in stores(tmp.path()) {
        let r = s.replica(&device(1), "phone", &twin).unwrap();
        let r = &*r;
        assert!(r.chain().unwrap().is_none(), "{what}");
        // Nothing to follow yet.
        assert!(
            matches!(store(r, A, 2, b"x"), Err(ReplicaError::NotNext { .. })),
            "{what}"
        );
        store(r, A, 1, b"full").unwrap();
        store(r, A, 2, b"delta").unwrap();
        // Not the next one, or of another chain: refused, the chain unchanged.
        for (c, seq) in [(A, 2), (A, 4), (B, 3)] {
            assert!(
                matches!(store(r, c, seq, b"no"), Err(ReplicaError::NotNext { .. })),
                "{what} {c} {seq}"
            );
        }
        assert_eq!(r.chain().unwrap(), Some((A.to_string(), 2)), "{what}");
        assert_eq!(
            contents(r),
            (A.into(), vec![b"full".to_vec(), b"delta".to_vec()]),
            "{what}"
        );
        // A new chain being received leaves the old one whole until it is committed, and
        // one dropped unfinished is never seen.
        let mut i = r.begin(B, 1).unwrap();
        i.write_all(b"half of a new full").unwrap();
        assert_eq!(contents(r).0, A, "{what}");
        drop(i);
        assert_eq!(
            contents(r),
            (A.into(), vec![b"full".to_vec(), b"delta".to_vec()]),
            "{what}"
        );
        store(r, B, 1, b"new full").unwrap();
        assert_eq!(
            contents(r),
            (B.into(), vec![b"new full".to_vec()]),
            "{what}"
        );
    }
    // Only the new chain and `current` are left in either store.
    assert_eq!(
        files_under(&tmp.path().join("twin")),
        vec!["current".to_string(), format!("{B}-00000001.pvr")]
    );
    let d = device(1).hex();
    assert_eq!(
        files_under(&tmp.path().join("objects")),
        vec![
            format!("{d}/phone/current"),
            format!("{d}/phone/{B}-00000001.pvr")
        ]
    );
}

#[test]
fn a_checkpoint_opened_for_sending_survives_a_new_chain() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, s, twin) in stores(tmp.path()) {
        let r = s.replica(&device(1), "phone", &twin).unwrap();
        store(&*r, A, 1, b"old full").unwrap();
        let (_, mut open) = r.open_chain().unwrap().unwrap();
        store(&*r, B, 1, b"new full").unwrap();
        let mut got = Vec::new();
        open[0].read_to_end(&mut got).unwrap();
        assert_eq!(got, b"old full", "{what}");
    }
}

#[test]
fn a_large_checkpoint_is_uploaded_in_parts_and_read_back_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let data: Vec<u8> = (0..(objects::PART * 2 + 12345))
        .map(|i| u8::try_from(i * 7 % 251).unwrap())
        .collect();
    for (what, s, twin) in stores(tmp.path()) {
        let r = s.replica(&device(1), "phone", &twin).unwrap();
        let mut i = r.begin(A, 1).unwrap();
        for piece in data.chunks(100_000) {
            i.write_all(piece).unwrap();
        }
        i.commit().unwrap();
        assert!(contents(&*r).1[0] == data, "{what}");
    }
}

#[test]
fn a_receive_killed_midway_leaves_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, s, twin) in stores(tmp.path()) {
        let r = s.replica(&device(1), "phone", &twin).unwrap();
        store(&*r, A, 1, b"full").unwrap();
        // As a killed process leaves it: an upload never completed.
        let mut i = r.begin(A, 2).unwrap();
        i.write_all(b"partial").unwrap();
        std::mem::forget(i);
        assert_eq!(contents(&*r), (A.into(), vec![b"full".to_vec()]), "{what}");
        store(&*r, A, 2, b"delta").unwrap();
        assert_eq!(r.chain().unwrap(), Some((A.to_string(), 2)), "{what}");
    }
    // What the killed receives left is gone: the temporary file, the staging file.
    assert_eq!(
        files_under(&tmp.path().join("twin")),
        vec![
            format!("{A}-00000001.pvr"),
            format!("{A}-00000002.pvr"),
            "current".to_string()
        ]
    );
    let d = device(1).hex();
    assert_eq!(
        files_under(&tmp.path().join("objects")),
        vec![
            format!("{d}/phone/{A}-00000001.pvr"),
            format!("{d}/phone/{A}-00000002.pvr"),
            format!("{d}/phone/current")
        ]
    );
}

#[test]
fn another_devices_replica_of_the_same_name_is_another_one() {
    let tmp = tempfile::tempdir().unwrap();
    let objects = tmp.path().join("objects");
    std::fs::create_dir(&objects).unwrap();
    let s = ReplicaStore::from_url(&format!("file://{}", objects.display())).unwrap();
    let mine = s.replica(&device(1), "phone", tmp.path()).unwrap();
    let theirs = s.replica(&device(2), "phone", tmp.path()).unwrap();
    // A name that another one's begins with is another replica too.
    let longer = s.replica(&device(1), "phone2", tmp.path()).unwrap();
    store(&*mine, A, 1, b"mine").unwrap();
    assert!(theirs.chain().unwrap().is_none());
    assert!(theirs.open_chain().unwrap().is_none());
    assert!(longer.chain().unwrap().is_none());
    assert!(matches!(
        store(&*theirs, A, 2, b"after mine?"),
        Err(ReplicaError::NotNext { .. })
    ));
    store(&*theirs, B, 1, b"theirs").unwrap();
    store(&*longer, B, 1, b"longer").unwrap();
    // Their new chain did not replace mine.
    assert_eq!(contents(&*mine), (A.into(), vec![b"mine".to_vec()]));
    assert_eq!(contents(&*theirs), (B.into(), vec![b"theirs".to_vec()]));
}

#[test]
fn malformed_chain_ids_numbers_and_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for (what, s, twin) in stores(tmp.path()) {
        let r = s.replica(&device(1), "phone", &twin).unwrap();
        for (c, seq) in [
            (A, 0),
            ("../x", 1),
            (&A[..31], 1),
            ("0123456789ABCDEF0123456789abcdef", 1),
        ] {
            assert!(
                matches!(r.begin(c, seq), Err(ReplicaError::Malformed)),
                "{what} {c} {seq}"
            );
        }
        for name in ["../phone", "a/b", "", "Phone"] {
            assert!(
                matches!(
                    s.replica(&device(1), name, &twin),
                    Err(ReplicaError::Malformed)
                ),
                "{what} {name:?}"
            );
        }
    }
}

#[test]
fn only_an_existing_absolute_file_url_is_a_store() {
    let tmp = tempfile::tempdir().unwrap();
    let good = format!("file://{}", tmp.path().display());
    assert!(ReplicaStore::from_url(&good).is_ok());
    for url in [
        "s3://bucket/replicas".to_string(),
        "file://relative/dir".to_string(),
        format!("{good}/missing"),
        format!("{good}?x=1"),
        tmp.path().display().to_string(),
    ] {
        assert!(
            matches!(
                ReplicaStore::from_url(&url),
                Err(ReplicaError::BadUrl { .. })
            ),
            "{url}"
        );
    }
}
