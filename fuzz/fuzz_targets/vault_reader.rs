//! Fuzzes the `.pvp` reader.
//!
//! Each input is used twice: as a whole file, and as a list of edits (3-byte records: `u16`
//! offset, XOR mask; a trailing `u16` truncates) applied to a valid file made once at start-up
//! with the same passphrase, so the fuzzer also reaches the chunk and manifest parsers behind
//! the header MAC. The reader must return an error or a manifest, never panic or hang.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vault::{
    EntryKind, EntrySource, ExportOptions, KdfParams, KeySpec, Manifest, Passphrase, ReadLimits,
    Unlock,
};

const PASSPHRASE: &str = "fuzz";

/// Keeps a flipped argon2 parameter from making an iteration slow.
const LIMITS: ReadLimits = ReadLimits {
    max_kdf_m_cost_kib: 64,
    max_kdf_t_cost: 2,
    max_kdf_p_cost: 1,
};

fn unlock() -> Unlock {
    Unlock::Passphrase(Passphrase::new(PASSPHRASE))
}

/// A valid file with a sparse entry, a dense one and several small chunks.
fn seed_file() -> &'static [u8] {
    static SEED: OnceLock<Vec<u8>> = OnceLock::new();
    SEED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vault-fuzz-seed-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the seed directory");
        let disk = dir.join("disk");
        let f = std::fs::File::create(&disk).expect("creating the seed disk");
        f.set_len(64 * 1024).expect("sizing the seed disk");
        std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 3000], 8192).expect("writing");
        let state = dir.join("state");
        std::fs::write(&state, b"{\"rip\":4096}").expect("writing the seed state");
        let out = dir.join("seed.pvp");
        vault::export_with(
            &out,
            Manifest::new("fuzz", serde_json::json!({"vcpus": 1}), None),
            &[
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
            ],
            &[KeySpec::Passphrase {
                passphrase: Passphrase::new(PASSPHRASE),
                params: KdfParams::INSECURE_FAST,
            }],
            &ExportOptions {
                chunk_size: 1024,
                zstd_level: 1,
                threads: 0,
                cancel: None,
                temp_tag: None,
            },
            &mut |_| {},
        )
        .expect("exporting the seed file");
        let bytes = std::fs::read(&out).expect("reading the seed file");
        let _ = std::fs::remove_dir_all(&dir);
        vault::verify_stream(&bytes[..], &unlock(), &LIMITS).expect("the seed file verifies");
        bytes
    })
}

fuzz_target!(|data: &[u8]| {
    let unlock = unlock();

    // The input as a whole file.
    let _ = vault::verify_stream(data, &unlock, &LIMITS);

    // The input as edits to a valid file.
    let mut file = seed_file().to_vec();
    let mut records = data.chunks_exact(3);
    for record in &mut records {
        let offset = usize::from(u16::from_le_bytes([record[0], record[1]])) % file.len();
        file[offset] ^= record[2];
    }
    if let [lo, hi] = records.remainder() {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])) % (file.len() + 1);
        file.truncate(len);
    }
    let result = vault::verify_stream(&file[..], &unlock, &LIMITS);
    if file == seed_file() {
        assert!(result.is_ok(), "the unmodified seed must verify");
    } else {
        assert!(result.is_err(), "a modified file must not verify");
    }
});
