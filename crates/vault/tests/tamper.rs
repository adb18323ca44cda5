//! Hostile files: flipped bytes, truncation, reordering, splicing, foreign versions.

mod common;

use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;
use vault::VaultError;

fn unlock() -> vault::Unlock {
    pass_unlock(PASSPHRASE)
}

#[test]
fn the_pristine_file_imports() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    assert!(chunks(&bytes).len() > 4, "want several chunks");
    import_bytes(dir.path(), &bytes, &unlock()).unwrap();
}

#[test]
fn every_flipped_byte_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let header = header_len(&bytes);
    // Every header byte, then a spread of body positions including chunk boundaries.
    let mut positions: Vec<usize> = (0..header).collect();
    positions.extend((header..bytes.len()).step_by(31));
    for range in chunks(&bytes) {
        positions.extend([range.start, range.start + 3, range.end - 1]);
    }
    positions.push(bytes.len() - 1);
    for pos in positions {
        let masks: &[u8] = if pos < header { &[0x01, 0x80] } else { &[0x04] };
        for &mask in masks {
            let mut bad = bytes.clone();
            bad[pos] ^= mask;
            let result = import_bytes(dir.path(), &bad, &unlock());
            assert!(result.is_err(), "flip {mask:#x} at {pos} was accepted");
        }
    }
}

#[test]
fn header_flips_give_the_expected_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let header = header_len(&bytes);
    for pos in 0..header {
        let mut bad = bytes.clone();
        bad[pos] ^= 0x01;
        let err = import_bytes(dir.path(), &bad, &unlock()).unwrap_err();
        let ok = match pos {
            0..=7 => matches!(err, VaultError::NotAPortableProfile),
            8..=9 => matches!(err, VaultError::UnsupportedVersion { .. }),
            10 => matches!(err, VaultError::UnsupportedCipher { .. }),
            // The rest of the fixed part is the slot's associated data, then the passphrase
            // slot itself: a changed KDF input, salt or wrapped key does not open it.
            p if p < header - 32 => matches!(
                err,
                VaultError::WrongKey | VaultError::CorruptHeader { .. } | VaultError::Truncated
            ),
            // The header MAC.
            _ => matches!(err, VaultError::CorruptHeader { .. }),
        };
        assert!(ok, "flip at {pos}: unexpected error {err:?}");
    }
}

#[test]
fn body_flips_are_corrupt_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let ranges = chunks(&bytes);
    for (i, range) in ranges.iter().enumerate() {
        // A flip inside the ciphertext of chunk i is reported at chunk i.
        let mut bad = bytes.clone();
        bad[range.start + 10] ^= 0x40;
        match import_bytes(dir.path(), &bad, &unlock()).unwrap_err() {
            VaultError::Corrupt { chunk, .. } => assert_eq!(chunk, i as u64),
            other => panic!("chunk {i}: {other:?}"),
        }
    }
}

#[test]
fn truncation_is_detected_at_every_length() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let mut lengths: Vec<usize> = (0..bytes.len()).step_by(23).collect();
    for range in chunks(&bytes) {
        lengths.extend([range.start, range.start + 2, range.start + 4, range.end - 1]);
    }
    for len in lengths {
        let err = import_bytes(dir.path(), &bytes[..len], &unlock()).unwrap_err();
        assert!(
            matches!(err, VaultError::Truncated | VaultError::Corrupt { .. }),
            "truncated to {len}: {err:?}"
        );
    }
    // Dropping the whole last chunk.
    let last = chunks(&bytes).pop().unwrap();
    let err = import_bytes(dir.path(), &bytes[..last.start], &unlock()).unwrap_err();
    assert!(matches!(err, VaultError::Truncated), "{err:?}");
}

#[test]
fn trailing_data_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let mut extra = bytes.clone();
    extra.push(0);
    let err = import_bytes(dir.path(), &extra, &unlock()).unwrap_err();
    assert!(matches!(err, VaultError::TrailingData), "{err:?}");
    // A copy of the last chunk appended.
    let last = chunks(&bytes).pop().unwrap();
    let mut doubled = bytes.clone();
    doubled.extend_from_slice(&bytes[last]);
    let err = import_bytes(dir.path(), &doubled, &unlock()).unwrap_err();
    assert!(matches!(err, VaultError::TrailingData), "{err:?}");
}

#[test]
fn reordered_dropped_and_relabelled_chunks_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");
    let ranges = chunks(&bytes);
    let header = &bytes[..ranges[0].start];
    let assemble = |order: &[usize]| {
        let mut out = header.to_vec();
        for &i in order {
            out.extend_from_slice(&bytes[ranges[i].clone()]);
        }
        out
    };
    let n = ranges.len();
    let identity: Vec<usize> = (0..n).collect();
    assert_eq!(assemble(&identity), bytes);

    let mut swapped = identity.clone();
    swapped.swap(1, 2);
    let mut dropped = identity.clone();
    dropped.remove(1);
    let mut repeated = identity.clone();
    repeated.insert(2, 1);
    for order in [swapped, dropped, repeated] {
        let err = import_bytes(dir.path(), &assemble(&order), &unlock()).unwrap_err();
        assert!(
            matches!(err, VaultError::Corrupt { .. }),
            "{order:?}: {err:?}"
        );
    }

    // Marking a middle chunk as last (and cutting there) is detected.
    let mut cut = bytes[..ranges[2].end].to_vec();
    cut[ranges[2].start + 3] |= 0x80;
    let err = import_bytes(dir.path(), &cut, &unlock()).unwrap_err();
    assert!(
        matches!(err, VaultError::Corrupt { chunk: 2, .. }),
        "{err:?}"
    );
}

#[test]
fn splicing_from_another_file_with_the_same_passphrase_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let a = small_file(dir.path(), "a.pvp");
    let b = small_file(dir.path(), "b.pvp");
    assert_ne!(a, b, "every file has its own key and salt");
    let ra = chunks(&a);
    let rb = chunks(&b);
    assert_eq!(ra.len(), rb.len());

    // One chunk from b at the same position in a.
    let mut spliced = a[..ra[2].start].to_vec();
    spliced.extend_from_slice(&b[rb[2].clone()]);
    spliced.extend_from_slice(&a[ra[2].end..]);
    let err = import_bytes(dir.path(), &spliced, &unlock()).unwrap_err();
    assert!(
        matches!(err, VaultError::Corrupt { chunk: 2, .. }),
        "{err:?}"
    );

    // a's header on b's chunks.
    let mut frankenstein = a[..ra[0].start].to_vec();
    frankenstein.extend_from_slice(&b[rb[0].start..]);
    let err = import_bytes(dir.path(), &frankenstein, &unlock()).unwrap_err();
    assert!(
        matches!(err, VaultError::Corrupt { chunk: 0, .. }),
        "{err:?}"
    );

    // b's key slot in a's header fails the header MAC.
    let mut slot_swap = a.clone();
    let slot_end = ra[0].start - 32;
    slot_swap[41..slot_end].copy_from_slice(&b[41..slot_end]);
    let err = import_bytes(dir.path(), &slot_swap, &unlock()).unwrap_err();
    assert!(
        matches!(err, VaultError::WrongKey | VaultError::CorruptHeader { .. }),
        "{err:?}"
    );
}

#[test]
fn foreign_versions_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_file(dir.path(), "a.pvp");

    let mut future = bytes.clone();
    future[8..10].copy_from_slice(&2u16.to_le_bytes());
    let err = import_bytes(dir.path(), &future, &unlock()).unwrap_err();
    assert!(
        matches!(
            err,
            VaultError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer pocketvisor"));

    let mut magic = bytes.clone();
    magic[0] = b'X';
    let err = import_bytes(dir.path(), &magic, &unlock()).unwrap_err();
    assert!(matches!(err, VaultError::NotAPortableProfile), "{err:?}");

    for foreign in [
        &b"hello world, this is not a profile"[..],
        b"\x7fELF",
        b"PVPROF\x00\x02xx",
    ] {
        let err = import_bytes(dir.path(), foreign, &unlock()).unwrap_err();
        assert!(matches!(err, VaultError::NotAPortableProfile), "{err:?}");
    }
    for short in [&b""[..], b"PVP", b"PVPROF\x00\x01"] {
        let err = import_bytes(dir.path(), short, &unlock()).unwrap_err();
        assert!(matches!(err, VaultError::Truncated), "{short:?}: {err:?}");
    }
}

fn fixture() -> &'static Vec<u8> {
    static FILE: OnceLock<Vec<u8>> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        small_file(dir.path(), "fixture.pvp")
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_flips_fail_cleanly(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4)
    ) {
        let original = fixture();
        let mut bad = original.clone();
        for (index, mask) in &flips {
            let pos = index.index(bad.len());
            bad[pos] ^= mask;
        }
        prop_assume!(&bad != original);
        let dir = tempfile::tempdir().unwrap();
        prop_assert!(import_bytes(dir.path(), &bad, &unlock()).is_err());
    }

    #[test]
    fn random_truncations_fail_cleanly(cut in any::<prop::sample::Index>()) {
        let original = fixture();
        let len = cut.index(original.len());
        let dir = tempfile::tempdir().unwrap();
        let err = import_bytes(dir.path(), &original[..len], &unlock()).unwrap_err();
        prop_assert!(
            matches!(err, VaultError::Truncated | VaultError::Corrupt { .. }),
            "{:?}", err
        );
    }

    #[test]
    fn random_garbage_fails_cleanly(garbage in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(vault::verify_stream(&garbage[..], &unlock(), &TEST_IMPORT.limits).is_err());
        let mut with_magic = vault::MAGIC.to_vec();
        with_magic.extend_from_slice(&[1, 0, 1, 0]);
        with_magic.extend_from_slice(&garbage);
        prop_assert!(vault::verify_stream(&with_magic[..], &unlock(), &TEST_IMPORT.limits).is_err());
    }
}
