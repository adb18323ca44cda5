//! Reading a portable profile file: inspect, verify and import.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};

use crate::error::{Result, VaultError};
use crate::export::sync_parent;
use crate::header;
use crate::keys::{ReadLimits, Unlock};
use crate::manifest::{EntryInfo, Manifest, MAX_MANIFEST_LEN};
use crate::sparse;
use crate::stream::ChunkReader;
use crate::{Phase, Progress};

const READ_BUF: usize = 256 * 1024;

/// Tuning knobs of `import_with`, `inspect_with` and `verify_with`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportOptions {
    /// Bounds on what the file may ask of the reader.
    pub limits: ReadLimits,
    /// Threads that open and decompress chunks (0: the calling thread does it; default: one
    /// per core, at most 4). `inspect` always reads on the calling thread.
    pub threads: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            limits: ReadLimits::default(),
            threads: crate::default_threads(),
        }
    }
}

/// Opens the file and returns its manifest, checking the header and the chunks holding the
/// manifest but not the rest of the file (use [`verify`] or [`import`] for that).
pub fn inspect(path: &Path, unlock: &Unlock) -> Result<Manifest> {
    inspect_with(path, unlock, &ImportOptions::default())
}

/// [`inspect`] with explicit options.
pub fn inspect_with(path: &Path, unlock: &Unlock, options: &ImportOptions) -> Result<Manifest> {
    let file = open_input(path)?;
    // Only the first chunks are needed: no read-ahead.
    let mut reader = open_stream(BufReader::new(file), unlock, &options.limits, 0)?;
    read_manifest(&mut reader)
}

/// Decrypts and checks the whole file without writing anything; returns its manifest.
pub fn verify(
    path: &Path,
    unlock: &Unlock,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    verify_with(path, unlock, &ImportOptions::default(), progress)
}

/// [`verify`] with explicit options.
pub fn verify_with(
    path: &Path,
    unlock: &Unlock,
    options: &ImportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    let file = open_input(path)?;
    let total = input_len(&file, path)?;
    key_progress(total, progress);
    let reader = open_stream(
        BufReader::new(file),
        unlock,
        &options.limits,
        options.threads,
    )?;
    read_body(reader, &mut NullSink, total, progress)
}

/// Decrypts and checks a whole file read from `input` on the calling thread, writing nothing.
/// Meant for fuzzing and for callers that stream the file from elsewhere.
pub fn verify_stream(input: impl Read, unlock: &Unlock, limits: &ReadLimits) -> Result<Manifest> {
    let reader = open_stream(input, unlock, limits, 0)?;
    read_body(reader, &mut NullSink, 0, &mut |_| {})
}

/// Imports the file into `dest_dir`, which must not exist, with the default options.
/// See [`import_with`].
pub fn import(
    path: &Path,
    unlock: &Unlock,
    dest_dir: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    import_with(path, unlock, dest_dir, &ImportOptions::default(), progress)
}

/// Imports the file into the new directory `dest_dir`.
///
/// The entries are written (holes kept sparse) into a temporary directory next to `dest_dir`;
/// only when every chunk has been verified is it synced and renamed to `dest_dir`. If anything
/// fails, or the process dies, `dest_dir` is not created. `progress` first sees
/// [`Phase::DerivingKey`] (the passphrase's argon2id runs then), then file bytes read out of
/// the file size.
pub fn import_with(
    path: &Path,
    unlock: &Unlock,
    dest_dir: &Path,
    options: &ImportOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    if exists(dest_dir)? {
        return Err(VaultError::DestinationExists {
            path: dest_dir.to_path_buf(),
        });
    }
    let file = open_input(path)?;
    let total = input_len(&file, path)?;
    // Check the key and the header before creating anything.
    key_progress(total, progress);
    let reader = open_stream(
        BufReader::new(file),
        unlock,
        &options.limits,
        options.threads,
    )?;

    let temp = TempDir::create(dest_dir)?;
    let mut sink = DirSink {
        root: temp.path.clone(),
        dirs: vec![temp.path.clone()],
        current: None,
    };
    let manifest = read_body(reader, &mut sink, total, progress)?;
    for dir in sink.dirs.iter().rev() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| VaultError::io(format!("syncing {}", dir.display()), e))?;
    }
    temp.commit(dest_dir)?;
    Ok(manifest)
}

fn open_input(path: &Path) -> Result<File> {
    File::open(path).map_err(|e| VaultError::io(format!("opening {}", path.display()), e))
}

fn input_len(file: &File, path: &Path) -> Result<u64> {
    Ok(file
        .metadata()
        .map_err(|e| VaultError::io(format!("reading {}", path.display()), e))?
        .len())
}

fn exists(path: &Path) -> Result<bool> {
    match fs::symlink_metadata(path) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(VaultError::io(format!("checking {}", path.display()), e)),
    }
}

/// Reports that the key derivation (the slow part of `open_stream`) starts.
fn key_progress(total: u64, progress: &mut dyn FnMut(Progress)) {
    progress(Progress {
        phase: Phase::DerivingKey,
        bytes_done: 0,
        bytes_total: total,
    });
}

fn open_stream<R: Read>(
    mut input: R,
    unlock: &Unlock,
    limits: &ReadLimits,
    threads: usize,
) -> Result<ChunkReader<R>> {
    let opened = header::open(&mut input, unlock, limits)?;
    ChunkReader::new(input, opened.keys, opened.len, threads)
}

fn read_manifest<R: Read>(reader: &mut ChunkReader<R>) -> Result<Manifest> {
    let mut len = [0u8; 4];
    reader.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MANIFEST_LEN {
        return Err(VaultError::bad_manifest(format!(
            "{len} bytes is too large"
        )));
    }
    let mut json = vec![0u8; len as usize];
    reader.read_exact(&mut json)?;
    let manifest: Manifest =
        serde_json::from_slice(&json).map_err(|e| VaultError::bad_manifest(e.to_string()))?;
    manifest.validate()?;
    Ok(manifest)
}

/// Where decrypted entries go.
trait EntrySink {
    fn start(&mut self, entry: &EntryInfo) -> Result<()>;
    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()>;
    fn end(&mut self) -> Result<()>;
}

fn read_body<R: Read>(
    mut reader: ChunkReader<R>,
    sink: &mut dyn EntrySink,
    total: u64,
    progress: &mut dyn FnMut(Progress),
) -> Result<Manifest> {
    let manifest = read_manifest(&mut reader)?;
    let report = |reader: &ChunkReader<R>, progress: &mut dyn FnMut(Progress)| {
        progress(Progress {
            phase: Phase::Data,
            bytes_done: reader.bytes_in(),
            bytes_total: total.max(reader.bytes_in()),
        })
    };
    report(&reader, progress);
    for entry in &manifest.entries {
        sink.start(entry)?;
        for extent in &entry.extents {
            let mut pos = extent.offset;
            let end = extent.offset + extent.length;
            while pos < end {
                let want = usize::try_from(end - pos)
                    .unwrap_or(usize::MAX)
                    .min(READ_BUF);
                let data = reader.read_some(want)?;
                if data.is_empty() {
                    return Err(VaultError::Corrupt {
                        chunk: reader.current_chunk(),
                        reason: format!("entry {:?} ends early", entry.name),
                    });
                }
                sink.write(pos, data)?;
                pos += data.len() as u64;
                report(&reader, progress);
            }
        }
        sink.end()?;
    }
    reader.finish()?;
    Ok(manifest)
}

/// Discards entries (for verification).
struct NullSink;

impl EntrySink for NullSink {
    fn start(&mut self, _: &EntryInfo) -> Result<()> {
        Ok(())
    }
    fn write(&mut self, _: u64, _: &[u8]) -> Result<()> {
        Ok(())
    }
    fn end(&mut self) -> Result<()> {
        Ok(())
    }
}

/// Writes entries as sparse files under `root`.
struct DirSink {
    root: PathBuf,
    /// Directories created so far (synced before the final rename).
    dirs: Vec<PathBuf>,
    current: Option<(File, PathBuf)>,
}

impl EntrySink for DirSink {
    fn start(&mut self, entry: &EntryInfo) -> Result<()> {
        // Names were validated: relative, normal components only, so this stays under root.
        let path = self.root.join(&entry.name);
        let mut parent = self.root.clone();
        if let Some((dirs, _)) = entry.name.rsplit_once('/') {
            for component in dirs.split('/') {
                parent.push(component);
                if !self.dirs.contains(&parent) {
                    DirBuilder::new()
                        .mode(0o700)
                        .create(&parent)
                        .map_err(|e| VaultError::io(format!("creating {}", parent.display()), e))?;
                    self.dirs.push(parent.clone());
                }
            }
        }
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| VaultError::io(format!("creating {}", path.display()), e))?;
        file.set_len(entry.length)
            .map_err(|e| VaultError::io(format!("sizing {}", path.display()), e))?;
        self.current = Some((file, path));
        Ok(())
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        let (file, path) = self
            .current
            .as_ref()
            .ok_or_else(|| VaultError::invalid_input("internal: write without an entry"))?;
        sparse::write_skipping_zeros(file, offset, data)
            .map_err(|e| VaultError::io(format!("writing {}", path.display()), e))
    }

    fn end(&mut self) -> Result<()> {
        if let Some((file, path)) = self.current.take() {
            file.sync_all()
                .map_err(|e| VaultError::io(format!("syncing {}", path.display()), e))?;
        }
        Ok(())
    }
}

/// A temporary directory next to the destination, removed unless committed.
struct TempDir {
    path: PathBuf,
    committed: bool,
}

impl TempDir {
    fn create(dest: &Path) -> Result<Self> {
        let name = dest
            .file_name()
            .ok_or_else(|| VaultError::invalid_input("the destination has no directory name"))?;
        let mut temp_name = OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".import-{:016x}", OsRng.next_u64()));
        let path = dest.with_file_name(temp_name);
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| VaultError::io(format!("creating {}", path.display()), e))?;
        Ok(TempDir {
            path,
            committed: false,
        })
    }

    fn commit(mut self, dest: &Path) -> Result<()> {
        rename_no_replace(&self.path, dest)?;
        self.committed = true;
        sync_parent(dest)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Renames `from` to `to`, failing with `DestinationExists` if `to` exists (even as an empty
/// directory, which a plain `rename` would replace).
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    let c_from = c_path(from)?;
    let c_to = c_path(to)?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call; AT_FDCWD
    // makes relative paths resolve like std's rename.
    let r = unsafe {
        // The raw system call: musl's libc (the static aarch64 build) has no renameat2().
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            c_from.as_ptr(),
            libc::AT_FDCWD,
            c_to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(VaultError::DestinationExists {
            path: to.to_path_buf(),
        }),
        // File systems without RENAME_NOREPLACE: check, then rename.
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if exists(to)? {
                return Err(VaultError::DestinationExists {
                    path: to.to_path_buf(),
                });
            }
            fs::rename(from, to)
                .map_err(|e| VaultError::io(format!("renaming to {}", to.display()), e))
        }
        _ => Err(VaultError::io(format!("renaming to {}", to.display()), err)),
    }
}

fn c_path(path: &Path) -> Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| VaultError::invalid_input(format!("{} contains a NUL byte", path.display())))
}
