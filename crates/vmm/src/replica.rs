//! Incremental checkpoints of a running VM (issue 13's replica), and rebuilding a snapshot
//! from a chain of them.
//!
//! [`Request::Checkpoint`](crate::Request::Checkpoint) writes one checkpoint into a directory:
//!
//! - `pages.bin`: runs of guest RAM, `addr u64 | length u32 | bytes`, repeated;
//! - `disks.bin`: runs of disk data, `disk u32 | offset u64 | length u32 | bytes`, repeated
//!   (each at most one 64 KiB chunk of virtio-blk's dirty tracking);
//! - `state.bin`: the paused VM's state container (the snapshot sections a migration sends);
//! - `checkpoint.json`: [`CheckpointMeta`] (whether it is full, the disks' sizes).
//!
//! Runs apply in file order: a later run of the same page or chunk replaces an earlier one.
//! The first checkpoint of a VM (and any after a migration, which shares the dirty logs) is
//! **full**: every non-zero page and disk chunk. Each later one holds what changed since the
//! one before: the pages of KVM's dirty log (ORed with device writes) and the disk chunks
//! virtio-blk marked. A checkpoint is taken like a migration's rounds: what changed is
//! copied while the guest runs, then the guest is paused only to copy what changed meanwhile
//! and its state, and resumed before the files are synced.
//!
//! These files are plaintext, on the device that runs the VM: the caller (`pocketvisor cloud
//! replicate`) seals them (the vault's format, for the profile's recovery keys) before they
//! leave it and removes them. [`Recovery`] applies a chain of them, in order, into a snapshot
//! directory and disk images that `Vm::restore` runs.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use devices::virtio::block::dirty::CHUNK_SIZE;

use crate::migration::{send_dirty, DiskBatch, DiskOut, PageBatch, RunSink};
use crate::snapshot::memory::{nonzero_runs, MemRegion, CHUNK};
use crate::vcpu::VcpuThread;
use crate::vm::Vm;
use crate::Error;

/// Guest RAM runs of a checkpoint.
pub const PAGES_FILE: &str = "pages.bin";
/// Disk runs of a checkpoint.
pub const DISKS_FILE: &str = "disks.bin";
/// The VM's state container.
pub const STATE_FILE: &str = "state.bin";
/// [`CheckpointMeta`] as JSON.
pub const META_FILE: &str = "checkpoint.json";
/// Every file of a checkpoint directory, in the order a sealed copy stores them.
pub const FILES: [&str; 4] = [META_FILE, STATE_FILE, PAGES_FILE, DISKS_FILE];

/// The largest state container a checkpoint may hold (as a migration's `State` frame).
const MAX_STATE: u64 = crate::migration::wire::MAX_PAYLOAD as u64;

fn err(why: impl std::fmt::Display) -> Error {
    Error::Replica(why.to_string())
}

/// What `checkpoint.json` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    /// Every non-zero page and disk chunk (the start of a chain), not only what changed.
    pub full: bool,
    /// The size in bytes of each disk, in the configuration's order.
    pub disk_sizes: Vec<u64>,
}

/// What a checkpoint took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointStats {
    /// Whether it is full (the first of a chain).
    pub full: bool,
    /// Guest pages written (the live copy and the paused one).
    pub pages: u64,
    /// Disk chunks written.
    pub disk_chunks: u64,
    /// Bytes of the checkpoint's files.
    pub bytes: u64,
    /// How long the guest stood still.
    pub pause: Duration,
    /// From the request to the synced files.
    pub total: Duration,
}

impl std::fmt::Display for CheckpointStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint full={} pages={} disk_chunks={} bytes={} pause_us={} total_ms={}",
            self.full,
            self.pages,
            self.disk_chunks,
            self.bytes,
            self.pause.as_micros(),
            self.total.as_millis()
        )
    }
}

/// Creates `dir/name` for writing (it must not exist), for this user only.
fn create_new(dir: &Path, name: &str) -> Result<File, Error> {
    let path = dir.join(name);
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(&path)
        .map_err(|e| err(format!("cannot create {}: {e}", path.display())))
}

/// A checkpoint's run files, which take the runs a migration would send as frames.
struct RunFiles {
    pages: File,
    disks: File,
}

impl RunFiles {
    fn write(file: &mut File, runs: &[u8]) -> Result<(), Error> {
        file.write_all(runs)
            .map_err(|e| err(format!("writing the checkpoint: {e}")))
    }

    /// Syncs both files; returns their size.
    fn finish(self) -> Result<u64, Error> {
        let mut bytes = 0;
        for file in [self.pages, self.disks] {
            file.sync_all()
                .map_err(|e| err(format!("syncing the checkpoint: {e}")))?;
            bytes += file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| err(format!("the checkpoint's size: {e}")))?;
        }
        Ok(bytes)
    }
}

impl RunSink for RunFiles {
    fn pages(&mut self, runs: &[u8]) -> Result<(), Error> {
        RunFiles::write(&mut self.pages, runs)
    }

    fn disk(&mut self, runs: &[u8]) -> Result<(), Error> {
        RunFiles::write(&mut self.disks, runs)
    }
}

/// A failure of the migration's code a checkpoint shares (reading pages and disk chunks), as
/// the replica's.
fn as_replica(e: Error) -> Error {
    match e {
        Error::Migration(why) => Error::Replica(why),
        other => other,
    }
}

impl Vm {
    /// Writes a checkpoint of this VM into `dir` (created; it must not exist): everything if
    /// `full` or if no checkpoint since the VM started or migrated, else what changed since
    /// the last one. The guest is paused only for the last changes and its state, and runs
    /// on afterwards (unless it was paused before). On failure the next checkpoint is full.
    pub(crate) fn checkpoint(
        &self,
        threads: &[VcpuThread],
        dir: &Path,
        full: bool,
    ) -> Result<CheckpointStats, Error> {
        let t0 = Instant::now();
        self.vcpu_save.check_snapshot_supported()?;
        if self.cfg.disks.iter().any(|d| d.encrypted) {
            return Err(err(
                "a VM with an encrypted disk is not replicated yet (its memory would leave the \
                 disk's key behind)",
            ));
        }
        // The chain goes on from the last checkpoint only if the logs ran since it.
        let full =
            full || !self.checkpointed.swap(false, Ordering::AcqRel) || !self.dirty.is_logging();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| err(format!("cannot create {}: {e}", dir.display())))?;
        let dirty_chunks = self.devices.disk_dirty_chunks();
        if dirty_chunks.len() != self.cfg.disks.len() {
            return Err(err(
                "the VM's disks are not the ones it was configured with",
            ));
        }
        let disks = self
            .cfg
            .disks
            .iter()
            .zip(dirty_chunks)
            .map(|(d, dirty)| DiskOut::open(&d.path, dirty))
            .collect::<Result<Vec<_>, _>>()
            .map_err(as_replica)?;
        let mut files = RunFiles {
            pages: create_new(dir, PAGES_FILE)?,
            disks: create_new(dir, DISKS_FILE)?,
        };
        let mut disk_batch = DiskBatch::new();

        // While the guest runs: everything (full) or what changed since the last checkpoint,
        // the logs then recording what changes meanwhile.
        let mut pages = 0;
        if full {
            self.dirty.start()?;
            disk_batch
                .send_all(&mut files, &disks, None)
                .map_err(as_replica)?;
            let mut batch = PageBatch::new();
            nonzero_runs(&self.mem, None, |r, offset, bytes| {
                batch.push(&mut files, r.guest_addr + offset, bytes)
            })
            .map_err(as_replica)?;
            batch.flush(&mut files)?;
            pages += batch.pages;
        } else {
            disk_batch
                .send_dirty(&mut files, &disks)
                .map_err(as_replica)?;
            pages += send_dirty(&mut files, &self.mem, &self.dirty.dirty_pages()?, || {})
                .map_err(as_replica)?;
            crate::migration::fault::kill_point("checkpoint-live");
        }

        // Paused: what changed during the copy, and the state.
        let was_paused = self.shared.pause.load(Ordering::Acquire);
        let paused_at = Instant::now();
        self.pause(threads)
            .map_err(|e| err(format!("cannot pause the VM: {e}")))?;
        // The last pages and disk chunks, after the VM-wide state (which may write guest RAM).
        let paused = self
            .state_sections_with_copy(threads, || {
                disk_batch
                    .send_dirty(&mut files, &disks)
                    .map_err(as_replica)?;
                send_dirty(&mut files, &self.mem, &self.dirty.dirty_pages()?, || {})
                    .map_err(as_replica)
            })
            .map(|(pages, state)| (pages, state.finish()));
        if !was_paused {
            self.resume(threads);
        }
        let pause = paused_at.elapsed();
        let (paused_pages, state) = paused?;
        pages += paused_pages;

        let mut bytes = files.finish()?;
        let mut f = create_new(dir, STATE_FILE)?;
        f.write_all(&state)
            .and_then(|()| f.sync_all())
            .map_err(|e| err(format!("writing the checkpoint's state: {e}")))?;
        bytes += state.len() as u64;
        let meta = serde_json::to_vec(&CheckpointMeta {
            full,
            disk_sizes: disks.iter().map(DiskOut::size).collect(),
        })
        .map_err(err)?;
        let mut f = create_new(dir, META_FILE)?;
        f.write_all(&meta)
            .and_then(|()| f.sync_all())
            .map_err(|e| err(format!("writing the checkpoint's description: {e}")))?;
        bytes += meta.len() as u64;
        hostfs::sync_dir(dir).map_err(|e| err(format!("syncing {}: {e}", dir.display())))?;
        self.checkpointed.store(true, Ordering::Release);
        Ok(CheckpointStats {
            full,
            pages,
            disk_chunks: disk_batch.chunks,
            bytes,
            pause,
            total: t0.elapsed(),
        })
    }
}

/// A snapshot directory and disk images being rebuilt from a chain of checkpoints, applied
/// in order with [`Recovery::apply`]; [`Recovery::finish`] puts them in place.
pub struct Recovery {
    out: PathBuf,
    temp: PathBuf,
    memory: Option<File>,
    regions: Vec<MemRegion>,
    config: Option<crate::VmConfig>,
    disk_paths: Vec<PathBuf>,
    /// Name the disks `disk<i>.img` in this directory once the first checkpoint says how
    /// many there are (instead of `disk_paths`).
    numbered: Option<PathBuf>,
    disks: Vec<(PathBuf, File)>,
    disk_sizes: Vec<u64>,
    state: Vec<u8>,
    applied: u64,
    finished: bool,
}

impl Recovery {
    /// Starts a snapshot directory `out` (which must not exist) and one disk image per path
    /// of `disks` (which must not exist either), written under temporary names until
    /// [`finish`](Self::finish).
    pub fn new(out: &Path, disks: &[PathBuf]) -> Result<Recovery, Error> {
        for p in std::iter::once(out).chain(disks.iter().map(PathBuf::as_path)) {
            if p.symlink_metadata().is_ok() {
                return Err(err(format!("{} exists; nothing was written", p.display())));
            }
        }
        let temp = temp_beside(out)?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&temp)
            .map_err(|e| err(format!("cannot create {}: {e}", temp.display())))?;
        Ok(Recovery {
            out: out.to_path_buf(),
            temp,
            memory: None,
            regions: Vec::new(),
            config: None,
            disk_paths: disks.to_vec(),
            numbered: None,
            disks: Vec::new(),
            disk_sizes: Vec::new(),
            state: Vec::new(),
            applied: 0,
            finished: false,
        })
    }

    /// [`Recovery::new`] with one disk image per disk of the VM, `disk<i>.img` in `dir` (none
    /// of which may exist), however many the first checkpoint says.
    pub fn numbered(out: &Path, dir: &Path) -> Result<Recovery, Error> {
        let mut r = Recovery::new(out, &[])?;
        r.numbered = Some(dir.to_path_buf());
        Ok(r)
    }

    /// Applies the checkpoint in directory `dir` (authenticated by the caller): the first
    /// must be full, and every one must describe the same VM (configuration, memory layout,
    /// disks). Every run is checked against that VM before it is written.
    pub fn apply(&mut self, dir: &Path) -> Result<(), Error> {
        let meta: CheckpointMeta = serde_json::from_slice(&read_small(dir, META_FILE, 1 << 20)?)
            .map_err(|e| err(format!("a malformed {META_FILE}: {e}")))?;
        let state = read_small(dir, STATE_FILE, MAX_STATE)?;
        let (config, regions) = crate::snapshot::describe_state(&state)?;
        match &self.config {
            None => {
                if !meta.full {
                    return Err(err(
                        "the chain does not start with a full checkpoint; nothing to start from",
                    ));
                }
                if let Some(d) = &self.numbered {
                    self.disk_paths = (0..config.disks.len())
                        .map(|i| d.join(format!("disk{i}.img")))
                        .collect();
                    if let Some(p) = self
                        .disk_paths
                        .iter()
                        .find(|p| p.symlink_metadata().is_ok())
                    {
                        return Err(err(format!("{} exists; nothing was written", p.display())));
                    }
                }
                if self.disk_paths.len() != config.disks.len()
                    || meta.disk_sizes.len() != config.disks.len()
                {
                    return Err(err(format!(
                        "the checkpoint has {} disks, {} disk paths were given",
                        config.disks.len(),
                        self.disk_paths.len()
                    )));
                }
                crate::snapshot::memory::check_layout(&regions, &config)?;
                let memory = create_new(&self.temp, crate::snapshot::MEMORY_FILE)?;
                let total = regions.iter().map(|r| r.size).sum();
                memory
                    .set_len(total)
                    .map_err(|e| err(format!("cannot size the memory file: {e}")))?;
                for (p, &size) in self.disk_paths.iter().zip(&meta.disk_sizes) {
                    let temp = temp_beside(p)?;
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .mode(0o600)
                        .open(&temp)
                        .map_err(|e| err(format!("cannot create {}: {e}", temp.display())))?;
                    f.set_len(size)
                        .map_err(|e| err(format!("cannot size {}: {e}", temp.display())))?;
                    self.disks.push((temp, f));
                }
                self.memory = Some(memory);
                self.regions = regions;
                self.disk_sizes = meta.disk_sizes.clone();
                self.config = Some(config);
            }
            Some(c) => {
                if *c != config || self.regions != regions || self.disk_sizes != meta.disk_sizes {
                    return Err(err(
                        "a checkpoint of another VM (configuration, memory or disks) in the chain",
                    ));
                }
            }
        }
        if meta.full {
            // A full checkpoint holds everything: what an earlier one wrote is not kept.
            let total: u64 = self.regions.iter().map(|r| r.size).sum();
            if let Some(m) = &self.memory {
                m.set_len(0)
                    .and_then(|()| m.set_len(total))
                    .map_err(|e| err(format!("cannot reset the memory file: {e}")))?;
            }
            for ((_, f), &size) in self.disks.iter().zip(&self.disk_sizes) {
                f.set_len(0)
                    .and_then(|()| f.set_len(size))
                    .map_err(|e| err(format!("cannot reset a disk: {e}")))?;
            }
        }
        self.apply_pages(&dir.join(PAGES_FILE))?;
        self.apply_disks(&dir.join(DISKS_FILE))?;
        self.state = state;
        self.applied += 1;
        Ok(())
    }

    fn apply_pages(&self, path: &Path) -> Result<(), Error> {
        let memory = self.memory.as_ref().ok_or_else(|| err("no memory file"))?;
        for_each_run(path, 12, |head, r| {
            let addr = u64::from_le_bytes(head[..8].try_into().map_err(err)?);
            let len = u32::from_le_bytes(head[8..12].try_into().map_err(err)?);
            let n = usize::try_from(len)
                .ok()
                .filter(|&n| n > 0 && n <= CHUNK)
                .ok_or_else(|| err(format!("a page run of {len} bytes")))?;
            let region = self
                .regions
                .iter()
                .find(|reg| reg.holds(addr, u64::from(len)))
                .ok_or_else(|| {
                    err(format!(
                        "a page run at {addr:#x}+{len:#x} outside guest RAM"
                    ))
                })?;
            let at = region.file_offset + (addr - region.guest_addr);
            let mut buf = vec![0u8; n];
            r.read_exact(&mut buf)
                .map_err(|e| err(format!("a page run is cut short: {e}")))?;
            memory
                .write_all_at(&buf, at)
                .map_err(|e| err(format!("writing the memory file: {e}")))
        })
    }

    fn apply_disks(&self, path: &Path) -> Result<(), Error> {
        for_each_run(path, 16, |head, r| {
            let disk = u32::from_le_bytes(head[..4].try_into().map_err(err)?);
            let offset = u64::from_le_bytes(head[4..12].try_into().map_err(err)?);
            let len = u32::from_le_bytes(head[12..16].try_into().map_err(err)?);
            let (_, file) = usize::try_from(disk)
                .ok()
                .and_then(|d| self.disks.get(d))
                .ok_or_else(|| err(format!("a disk run for disk {disk}, which does not exist")))?;
            let size = self.disk_sizes[usize::try_from(disk).map_err(err)?];
            if len == 0
                || u64::from(len) > CHUNK_SIZE
                || offset.checked_add(u64::from(len)).is_none_or(|e| e > size)
            {
                return Err(err(format!(
                    "a disk run at {offset:#x}+{len:#x} outside disk {disk} ({size} bytes)"
                )));
            }
            let mut buf = vec![0u8; usize::try_from(len).map_err(err)?];
            r.read_exact(&mut buf)
                .map_err(|e| err(format!("a disk run is cut short: {e}")))?;
            file.write_all_at(&buf, offset)
                .map_err(|e| err(format!("writing disk {disk}: {e}")))
        })
    }

    /// How many checkpoints were applied.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    /// Writes the last checkpoint's state, syncs everything and renames the snapshot
    /// directory and the disks into place. Returns the VM's configuration.
    pub fn finish(mut self) -> Result<crate::VmConfig, Error> {
        let config = self
            .config
            .clone()
            .ok_or_else(|| err("no checkpoint was applied"))?;
        if let Some(m) = &self.memory {
            m.sync_all()
                .map_err(|e| err(format!("syncing the memory file: {e}")))?;
        }
        for (_, f) in &self.disks {
            f.sync_all()
                .map_err(|e| err(format!("syncing a disk: {e}")))?;
        }
        crate::snapshot::write_recovered(&self.temp, &self.state, &config)?;
        for ((temp, _), path) in self.disks.iter().zip(&self.disk_paths) {
            rename_new(temp, path)?;
        }
        rename_new(&self.temp, &self.out)?;
        self.finished = true;
        Ok(config)
    }
}

impl Drop for Recovery {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.temp);
            for (temp, _) in &self.disks {
                let _ = std::fs::remove_file(temp);
            }
        }
    }
}

/// A hidden temporary name beside `path`: `.NAME.recovering-PID`.
fn temp_beside(path: &Path) -> Result<PathBuf, Error> {
    let name = path
        .file_name()
        .ok_or_else(|| err(format!("{} names no file", path.display())))?;
    let mut t = std::ffi::OsString::from(".");
    t.push(name);
    t.push(format!(".recovering-{}", std::process::id()));
    Ok(path.with_file_name(t))
}

/// Renames `from` to `to` unless `to` exists, and syncs the directory.
fn rename_new(from: &Path, to: &Path) -> Result<(), Error> {
    if to.symlink_metadata().is_ok() {
        return Err(err(format!(
            "{} appeared meanwhile; nothing was replaced",
            to.display()
        )));
    }
    std::fs::rename(from, to)
        .map_err(|e| err(format!("cannot rename into {}: {e}", to.display())))?;
    let dir = match to.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    hostfs::sync_dir(dir).map_err(|e| err(format!("syncing {}: {e}", dir.display())))
}

/// Reads `dir/name`, at most `max` bytes.
fn read_small(dir: &Path, name: &str, max: u64) -> Result<Vec<u8>, Error> {
    let path = dir.join(name);
    let f = hostfs::open_regular(&path, false)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let mut out = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut out)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    if out.len() as u64 > max {
        return Err(err(format!(
            "{} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(out)
}

/// Calls `each` with every run's header (`head` bytes) and the reader positioned at its data,
/// which `each` must consume whole.
fn for_each_run(
    path: &Path,
    head: usize,
    mut each: impl FnMut(&[u8], &mut dyn Read) -> Result<(), Error>,
) -> Result<(), Error> {
    let f = hostfs::open_regular(path, false)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))?;
    let mut r = std::io::BufReader::with_capacity(1 << 20, f);
    let mut header = vec![0u8; head];
    loop {
        // The end of the file may only come between runs.
        let mut got = 0;
        while got < head {
            let n = r
                .read(&mut header[got..])
                .map_err(|e| err(format!("reading {}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        match got {
            0 => return Ok(()),
            n if n < head => return Err(err("a run's header is cut short")),
            _ => each(&header, &mut r)?,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("pv-replica-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn runs_are_read_whole_and_a_cut_header_is_refused() {
        let d = scratch("runs");
        let f = d.join("runs.bin");
        let mut bytes = Vec::new();
        for (addr, data) in [(0x1000u64, vec![1u8; 8]), (0x3000, vec![2; 3])] {
            bytes.extend_from_slice(&addr.to_le_bytes());
            bytes.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
            bytes.extend_from_slice(&data);
        }
        std::fs::write(&f, &bytes).unwrap();
        let mut seen = Vec::new();
        for_each_run(&f, 12, |head, r| {
            let len = u32::from_le_bytes(head[8..12].try_into().unwrap());
            let mut data = vec![0; len as usize];
            r.read_exact(&mut data).map_err(err)?;
            seen.push((u64::from_le_bytes(head[..8].try_into().unwrap()), data));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(0x1000, vec![1; 8]), (0x3000, vec![2; 3])]);
        bytes.extend_from_slice(&[7; 5]);
        std::fs::write(&f, &bytes).unwrap();
        let e = for_each_run(&f, 12, |head, r| {
            let len = u32::from_le_bytes(head[8..12].try_into().unwrap());
            std::io::copy(&mut r.take(u64::from(len)), &mut std::io::sink()).map_err(err)?;
            Ok(())
        })
        .unwrap_err();
        assert!(e.to_string().contains("cut short"), "{e}");
        let _ = std::fs::remove_dir_all(d);
    }

    #[test]
    fn a_recovery_writes_nothing_over_existing_files_and_leaves_nothing_when_dropped() {
        let d = scratch("recovery");
        std::fs::write(d.join("taken.img"), b"mine").unwrap();
        let e = Recovery::new(&d.join("snap"), &[d.join("taken.img")])
            .err()
            .unwrap();
        assert!(e.to_string().contains("exists"), "{e}");
        assert_eq!(std::fs::read(d.join("taken.img")).unwrap(), b"mine");
        // A checkpoint that is not one (no description) is refused, and the dropped recovery
        // leaves no temporary directory.
        let mut r = Recovery::new(&d.join("snap"), &[d.join("new.img")]).unwrap();
        let junk = d.join("junk");
        std::fs::create_dir_all(&junk).unwrap();
        assert!(r.apply(&junk).is_err());
        std::fs::write(
            junk.join(META_FILE),
            br#"{"full":true,"disk_sizes":[1],"x":1}"#,
        )
        .unwrap();
        assert!(r
            .apply(&junk)
            .unwrap_err()
            .to_string()
            .contains("malformed"));
        drop(r);
        let mut left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, vec!["junk", "taken.img"]);
        let _ = std::fs::remove_dir_all(d);
    }
}
