//! Shared helpers of the vault integration tests.
#![allow(dead_code)]

use std::fs::{self, File};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use vault::{
    EntryKind, EntrySource, ExportOptions, ImportOptions, KdfParams, KeySpec, Manifest, Passphrase,
    ReadLimits, Unlock, VaultError,
};

pub const PASSPHRASE: &str = "correct horse battery staple";
pub const MIB: u64 = 1024 * 1024;

/// Small chunks so even small files have many chunks.
pub const SMALL_CHUNKS: ExportOptions = ExportOptions {
    chunk_size: 1024,
    zstd_level: 1,
    threads: 2,
    cancel: None,
    temp_tag: None,
};

/// Read limits that keep any flipped argon2 parameter cheap.
pub const TEST_IMPORT: ImportOptions = ImportOptions {
    limits: ReadLimits {
        max_kdf_m_cost_kib: 64,
        max_kdf_t_cost: 2,
        max_kdf_p_cost: 1,
    },
    threads: 2,
};

pub fn pass_key(p: &str) -> KeySpec {
    KeySpec::Passphrase {
        passphrase: Passphrase::new(p),
        params: KdfParams::INSECURE_FAST,
    }
}

pub fn pass_unlock(p: &str) -> Unlock {
    Unlock::Passphrase(Passphrase::new(p))
}

pub fn manifest() -> Manifest {
    Manifest::new(
        "work",
        serde_json::json!({"memory_mib": 256, "vcpus": 2}),
        Some(serde_json::json!({"camera": false})),
    )
}

/// Deterministic, poorly compressible bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[3]
        })
        .collect()
}

/// A profile with a sparse 64 MiB disk (two written extents), a snapshot state file and a
/// snapshot memory file in a subdirectory.
pub fn big_profile(dir: &Path) -> Vec<EntrySource> {
    let disk = dir.join("disk.raw");
    let f = File::create(&disk).unwrap();
    f.set_len(64 * MIB).unwrap();
    f.write_all_at(&noise(100 * 1024, 1), MIB).unwrap();
    f.write_all_at(&vec![0xA5; 64 * 1024], 40 * MIB).unwrap();
    f.sync_all().unwrap();
    let state = dir.join("state.bin");
    fs::write(&state, br#"{"vcpus":[{"rip":4096}],"devices":[]}"#).unwrap();
    let memory = dir.join("memory.bin");
    let mut mem = vec![0u8; 512 * 1024];
    mem[..64 * 1024].copy_from_slice(&noise(64 * 1024, 2));
    fs::write(&memory, &mem).unwrap();
    vec![
        EntrySource {
            name: "disk.raw".into(),
            kind: EntryKind::Disk,
            path: disk,
        },
        EntrySource {
            name: "snapshot/state".into(),
            kind: EntryKind::SnapshotState,
            path: state,
        },
        EntrySource {
            name: "snapshot/memory".into(),
            kind: EntryKind::SnapshotMemory,
            path: memory,
        },
    ]
}

/// A small profile (a few KiB) for corruption tests.
pub fn small_profile(dir: &Path) -> Vec<EntrySource> {
    let disk = dir.join("small-disk.raw");
    let mut data = noise(3000, 3);
    data.extend_from_slice(&[7u8; 2000]);
    fs::write(&disk, &data).unwrap();
    let state = dir.join("small-state.bin");
    fs::write(&state, b"state").unwrap();
    vec![
        EntrySource {
            name: "disk.raw".into(),
            kind: EntryKind::Disk,
            path: disk,
        },
        EntrySource {
            name: "state".into(),
            kind: EntryKind::SnapshotState,
            path: state,
        },
    ]
}

/// Exports `small_profile` with small chunks and a cheap passphrase; returns the file bytes.
pub fn small_file(dir: &Path, name: &str) -> Vec<u8> {
    let out = dir.join(name);
    let entries = small_profile(dir);
    vault::export_with(
        &out,
        manifest(),
        &entries,
        &[pass_key(PASSPHRASE)],
        &SMALL_CHUNKS,
        &mut |_| {},
    )
    .unwrap();
    fs::read(&out).unwrap()
}

/// Length of the header (through its MAC), parsed from the documented layout.
pub fn header_len(file: &[u8]) -> usize {
    let slots = file[40] as usize;
    let mut pos = 41;
    for _ in 0..slots {
        let len = u16::from_le_bytes([file[pos + 1], file[pos + 2]]) as usize;
        pos += 3 + len;
    }
    pos + 32
}

/// Byte ranges of each chunk (length word included).
pub fn chunks(file: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut pos = header_len(file);
    let mut out = Vec::new();
    while pos < file.len() {
        let word = u32::from_le_bytes(file[pos..pos + 4].try_into().unwrap());
        let len = (word & 0x7fff_ffff) as usize;
        out.push(pos..pos + 4 + len);
        pos += 4 + len;
    }
    out
}

/// Writes `bytes` as a `.pvp` file and tries to import it; checks that nothing was created.
pub fn import_bytes(dir: &Path, bytes: &[u8], unlock: &Unlock) -> Result<(), VaultError> {
    let input = dir.join("input.pvp");
    fs::write(&input, bytes).unwrap();
    let dest = dir.join("dest");
    let result = vault::import_with(&input, unlock, &dest, &TEST_IMPORT, &mut |_| {});
    if result.is_err() {
        assert!(!dest.exists(), "destination created by a failed import");
        assert_no_leftovers(dir);
    } else {
        fs::remove_dir_all(&dest).unwrap();
    }
    result.map(|_| ())
}

/// Asserts that no temporary file or directory is left in `dir`.
pub fn assert_no_leftovers(dir: &Path) {
    for entry in fs::read_dir(dir).unwrap() {
        let name = entry.unwrap().file_name();
        let name = name.to_string_lossy();
        assert!(
            !name.contains(".tmp-") && !name.contains(".import-"),
            "leftover temporary {name}"
        );
    }
}

/// Allocated bytes of a file.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

pub fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}
