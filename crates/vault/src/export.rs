//! Writing a portable profile file, atomically.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rand_core::{OsRng, RngCore};

use crate::error::{Result, VaultError};
use crate::header;
use crate::keys::{encode_public, KeySpec};
use crate::manifest::{validate_entry_name, EntryInfo, EntryKind, KeyInfo, Manifest};
use crate::sparse;
use crate::stream::ChunkWriter;
use crate::{Phase, Progress};

/// Most bytes read between two progress reports.
const READ_BUF: usize = 1024 * 1024;

/// A file to store in the profile file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntrySource {
    /// Name inside the profile file (relative `/`-separated path).
    pub name: String,
    /// What the entry is.
    pub kind: EntryKind,
    /// Where to read it from. It is only read, never modified.
    pub path: PathBuf,
}

/// Tuning knobs of `export_with`.
#[derive(Debug, Clone, Copy)]
pub struct ExportOptions {
    /// Plaintext bytes per chunk (1 KiB to 16 MiB; default 1 MiB).
    pub chunk_size: u32,
    /// zstd compression level (default 3).
    pub zstd_level: i32,
    /// Threads that compress and seal chunks (0: the calling thread does it; default: one
    /// per core, at most 4). The file is the same whatever the number.
    pub threads: usize,
    /// When set (e.g. by a SIGINT handler), the export stops with
    /// [`VaultError::Interrupted`] and leaves nothing under the output name.
    pub cancel: Option<&'static AtomicBool>,
    /// The suffix of the temporary file (`<out>.tmp-<16 hex digits>`, see [`temp_path`]);
    /// `None`: a random one. A caller that records the temporary name (so a later run can
    /// remove what a killed export left) chooses it.
    pub temp_tag: Option<u64>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            chunk_size: 1024 * 1024,
            zstd_level: 3,
            threads: crate::default_threads(),
            cancel: None,
            temp_tag: None,
        }
    }
}

/// What an export did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportStats {
    /// Entry bytes read and stored (holes excluded).
    pub bytes_stored: u64,
    /// Size of the written file.
    pub file_size: u64,
    /// Number of entries.
    pub entries: usize,
}

/// Writes `entries` and `manifest` to `out` with the default options. See [`export_with`].
pub fn export(
    out: &Path,
    manifest: Manifest,
    entries: &[EntrySource],
    keys: &[KeySpec],
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportStats> {
    export_with(
        out,
        manifest,
        entries,
        keys,
        &ExportOptions::default(),
        progress,
    )
}

/// Writes a portable profile file to `out`.
///
/// The manifest's `entries` and `keys` are replaced by what is actually stored. The file is
/// written to `<out>.tmp-<random>` in the same directory, synced, and renamed onto `out` (an
/// existing file there is replaced); on any error, or if the process dies, nothing appears under
/// `out`. The sources are opened read-only. `progress` first sees [`Phase::DerivingKey`] (the
/// passphrase's argon2id runs then), then entry bytes read out of the total.
pub fn export_with(
    out: &Path,
    manifest: Manifest,
    entries: &[EntrySource],
    keys: &[KeySpec],
    options: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportStats> {
    // The manifest is checked before the (slow) key derivation.
    let (checked, _, _) = prepare_manifest(manifest.clone(), entries, &key_infos(keys))?;
    progress(Progress {
        phase: Phase::DerivingKey,
        bytes_done: 0,
        bytes_total: checked.stored_bytes(),
    });
    let sealed = seal_keys(keys, options)?;
    export_sealed(out, manifest, entries, sealed, options, progress)
}

/// A new file's header, sealed for its keys: the passphrase's argon2id has run. Made by
/// [`seal_keys`] before anything slow or disruptive (like pausing the guest being exported),
/// used once by [`export_sealed`].
pub struct SealedKeys {
    header: Vec<u8>,
    stream: header::StreamKeys,
    infos: Vec<KeyInfo>,
}

impl std::fmt::Debug for SealedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedKeys(<redacted>)")
    }
}

/// Derives the keys of a new file (argon2id for a passphrase: the slow part) and seals its
/// header, with `options.chunk_size`.
pub fn seal_keys(keys: &[KeySpec], options: &ExportOptions) -> Result<SealedKeys> {
    let (header, stream) = header::create(keys, options.chunk_size)?;
    Ok(SealedKeys {
        header,
        stream,
        infos: key_infos(keys),
    })
}

fn key_infos(keys: &[KeySpec]) -> Vec<KeyInfo> {
    keys.iter()
        .map(|k| match k {
            KeySpec::Passphrase { .. } => KeyInfo::Passphrase,
            KeySpec::Recipient(public) => KeyInfo::Recipient {
                public_key: encode_public(public),
            },
        })
        .collect()
}

/// The manifest with its entries and keys filled in and checked, encoded.
fn prepare_manifest(
    mut manifest: Manifest,
    entries: &[EntrySource],
    keys: &[KeyInfo],
) -> Result<(Manifest, Vec<u8>, u32)> {
    manifest.entries = describe_entries(entries)?;
    manifest.keys = keys.to_vec();
    manifest.validate().map_err(|e| match e {
        VaultError::BadManifest { reason } => VaultError::invalid_input(reason),
        other => other,
    })?;
    let manifest_json = serde_json::to_vec(&manifest)
        .map_err(|e| VaultError::invalid_input(format!("cannot encode the manifest: {e}")))?;
    let manifest_len = u32::try_from(manifest_json.len())
        .ok()
        .filter(|&n| n <= crate::manifest::MAX_MANIFEST_LEN)
        .ok_or_else(|| VaultError::invalid_input("the manifest is too large"))?;
    Ok((manifest, manifest_json, manifest_len))
}

/// [`export_with`] with keys sealed beforehand by [`seal_keys`] (no key derivation here; the
/// chunk size is the one the keys were sealed with).
pub fn export_sealed(
    out: &Path,
    manifest: Manifest,
    entries: &[EntrySource],
    sealed: SealedKeys,
    options: &ExportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportStats> {
    let SealedKeys {
        header: header_bytes,
        stream: stream_keys,
        infos,
    } = sealed;
    let (manifest, manifest_json, manifest_len) = prepare_manifest(manifest, entries, &infos)?;
    let total = manifest.stored_bytes();
    let (temp, mut file) = TempFile::create(out, options.temp_tag)?;
    std::io::Write::write_all(&mut file, &header_bytes)
        .map_err(|e| VaultError::io("writing the profile file", e))?;
    let mut writer = ChunkWriter::new(file, stream_keys, options.zstd_level, options.threads)?;
    writer.write_all(&manifest_len.to_le_bytes())?;
    writer.write_all(&manifest_json)?;

    let mut done = 0u64;
    progress(Progress {
        phase: Phase::Data,
        bytes_done: 0,
        bytes_total: total,
    });
    for (source, info) in entries.iter().zip(&manifest.entries) {
        let file = open_source(source)?;
        let read_err = |e| VaultError::io(format!("reading {}", source.path.display()), e);
        let len = file.metadata().map_err(read_err)?.len();
        if len != info.length {
            return Err(read_err(std::io::Error::other(
                "the file changed size during export",
            )));
        }
        for extent in &info.extents {
            let mut pos = extent.offset;
            let end = extent.offset + extent.length;
            while pos < end {
                if options.cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
                    return Err(VaultError::Interrupted);
                }
                let want = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(READ_BUF);
                // Read straight into the chunk being filled.
                let n =
                    writer.write_with(want, |room| file.read_at(room, pos).map_err(read_err))?;
                if n == 0 {
                    return Err(read_err(std::io::Error::other(
                        "the file shrank during export",
                    )));
                }
                pos += n as u64;
                done += n as u64;
                progress(Progress {
                    phase: Phase::Data,
                    bytes_done: done,
                    bytes_total: total,
                });
            }
        }
    }

    let file = writer.finish()?;
    file.sync_all()
        .map_err(|e| VaultError::io("syncing the profile file", e))?;
    let file_size = file
        .metadata()
        .map_err(|e| VaultError::io("reading the profile file size", e))?
        .len();
    drop(file);
    temp.commit()?;
    Ok(ExportStats {
        bytes_stored: done,
        file_size,
        entries: entries.len(),
    })
}

fn open_source(source: &EntrySource) -> Result<File> {
    File::open(&source.path)
        .map_err(|e| VaultError::io(format!("opening {}", source.path.display()), e))
}

fn describe_entries(entries: &[EntrySource]) -> Result<Vec<EntryInfo>> {
    let mut infos = Vec::with_capacity(entries.len());
    for source in entries {
        validate_entry_name(&source.name).map_err(VaultError::invalid_input)?;
        let file = open_source(source)?;
        let meta = file
            .metadata()
            .map_err(|e| VaultError::io(format!("reading {}", source.path.display()), e))?;
        if !meta.is_file() {
            return Err(VaultError::invalid_input(format!(
                "{} is not a regular file",
                source.path.display()
            )));
        }
        let extents = sparse::data_extents(&file, meta.len()).map_err(|e| {
            VaultError::io(format!("finding the data in {}", source.path.display()), e)
        })?;
        infos.push(EntryInfo {
            name: source.name.clone(),
            kind: source.kind,
            length: meta.len(),
            extents,
        });
    }
    Ok(infos)
}

/// The temporary name an export to `out` writes before its rename: `<out>.tmp-<tag as 16
/// hex digits>` in the same directory; `None` if `out` has no file name.
pub fn temp_path(out: &Path, tag: u64) -> Option<PathBuf> {
    let mut name = OsString::from(out.file_name()?);
    name.push(format!(".tmp-{tag:016x}"));
    Some(out.with_file_name(name))
}

/// A temporary output file that is removed unless committed.
struct TempFile {
    temp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl TempFile {
    fn create(out: &Path, tag: Option<u64>) -> Result<(Self, File)> {
        let temp = temp_path(out, tag.unwrap_or_else(|| OsRng.next_u64()))
            .ok_or_else(|| VaultError::invalid_input("the output path has no file name"))?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| VaultError::io(format!("creating {}", temp.display()), e))?;
        let guard = TempFile {
            temp,
            out: out.to_path_buf(),
            committed: false,
        };
        Ok((guard, file))
    }

    fn commit(mut self) -> Result<()> {
        fs::rename(&self.temp, &self.out)
            .map_err(|e| VaultError::io(format!("renaming onto {}", self.out.display()), e))?;
        self.committed = true;
        sync_parent(&self.out)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Syncs the directory holding `path` so a rename into it is durable.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| VaultError::io(format!("syncing {}", parent.display()), e))
}
