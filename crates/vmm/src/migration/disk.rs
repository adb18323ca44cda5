//! Disks in a live migration: the source sends each disk whole while the guest runs (all-zero
//! chunks skipped, so a sparse image stays sparse), then the chunks virtio-blk marked as
//! written since (see [`DirtyChunks`]), round after round, and the last ones in the pause.
//! The destination writes them into a temporary file beside its disk path, fsyncs it, and
//! renames it over that path only at `Commit`; until then nothing at the destination changes,
//! and a [`DiskIn`] dropped before its commit removes its temporary file.
//!
//! A `Disk` frame's payload: `disk u32 | offset u64 | length u32 | bytes`, repeated. Every
//! field is checked against the disks the destination opened: the disk exists, the range is
//! inside it and no longer than [`CHUNK_SIZE`].

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use devices::virtio::block::dirty::CHUNK_SIZE;
use devices::virtio::block::DirtyChunks;

use super::base::{self, Digest32};
use super::{refused, RunSink};
use crate::Error;

/// Bytes of a disk run's header.
const RUN_HEADER: usize = 16;
/// [`CHUNK_SIZE`] as a buffer length.
const CHUNK_LEN: usize = 64 << 10;
const _: () = assert!(CHUNK_LEN as u64 == CHUNK_SIZE);
/// A `Disk` frame is sent once it holds this many bytes.
const FRAME_BYTES: usize = 1 << 20;

/// One disk at the source: the image and the chunks the guest wrote since they were sent.
pub(crate) struct DiskOut {
    file: File,
    dirty: Arc<DirtyChunks>,
}

impl DiskOut {
    /// Opens the image at `path` for reading; `dirty` is its block device's bitmap.
    pub(crate) fn open(path: &Path, dirty: Arc<DirtyChunks>) -> Result<DiskOut, Error> {
        let file = hostfs::open_regular(path, false)
            .map_err(|e| refused(format!("cannot read disk {}: {e}", path.display())))?;
        Ok(DiskOut { file, dirty })
    }

    /// The disk's size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.dirty.disk_bytes()
    }

    /// Its chunks, as a base lists them.
    pub(crate) fn chunk_count(&self) -> u64 {
        self.dirty.chunk_count()
    }
}

/// Which chunks of the first round to leave out.
#[derive(Clone, Copy)]
enum Skip<'a> {
    /// All-zero chunks (the destination starts from a file of holes).
    Zero,
    /// Chunks whose digest is the destination's (it starts from its base).
    Same(&'a Digest32),
    /// None (a chunk written since it was sent).
    Never,
}

/// Runs of disk data gathered into `Disk` frames (or a checkpoint's `disks.bin`).
pub(crate) struct DiskBatch {
    payload: Vec<u8>,
    buf: Vec<u8>,
    /// Chunks sent so far.
    pub(crate) chunks: u64,
    /// Bytes left out because the destination's base had them.
    pub(crate) skipped: u64,
}

impl DiskBatch {
    pub(crate) fn new() -> DiskBatch {
        DiskBatch {
            payload: Vec::with_capacity(FRAME_BYTES + CHUNK_LEN + RUN_HEADER),
            buf: vec![0; CHUNK_LEN],
            chunks: 0,
            skipped: 0,
        }
    }

    /// Sends every chunk of every disk that is not all zeros, or with `base` every chunk
    /// whose digest differs from the base's, after clearing the dirty bitmaps (writes
    /// completing from now on are sent again later).
    pub(crate) fn send_all(
        &mut self,
        ch: &mut impl RunSink,
        disks: &[DiskOut],
        base: Option<&[Vec<Digest32>]>,
    ) -> Result<(), Error> {
        for (i, d) in disks.iter().enumerate() {
            d.dirty.take();
            for c in 0..d.dirty.chunk_count() {
                let skip = match base {
                    // The base was checked to have one digest per chunk.
                    Some(b) => Skip::Same(&b[i][usize::try_from(c).map_err(refused)?]),
                    None => Skip::Zero,
                };
                self.send_chunk(ch, i, d, c, skip)?;
            }
        }
        self.flush(ch)
    }

    /// Sends the chunks written since they were last sent. Returns how many bytes they were.
    pub(crate) fn send_dirty(
        &mut self,
        ch: &mut impl RunSink,
        disks: &[DiskOut],
    ) -> Result<u64, Error> {
        let mut bytes = 0;
        for (i, d) in disks.iter().enumerate() {
            for c in d.dirty.take() {
                bytes += self.send_chunk(ch, i, d, c, Skip::Never)?;
            }
        }
        self.flush(ch)?;
        Ok(bytes)
    }

    /// Bytes the chunks now marked in `disks` would take.
    pub(crate) fn pending(disks: &[DiskOut]) -> u64 {
        disks.iter().map(|d| d.dirty.count() * CHUNK_SIZE).sum()
    }

    fn send_chunk(
        &mut self,
        ch: &mut impl RunSink,
        disk: usize,
        d: &DiskOut,
        chunk: u64,
        skip: Skip<'_>,
    ) -> Result<u64, Error> {
        let Some((offset, len)) = d.dirty.chunk_range(chunk) else {
            return Ok(0);
        };
        // len <= CHUNK_SIZE: it fits the buffer and a u32.
        let n = usize::try_from(len).map_err(|_| refused("a disk chunk"))?;
        let len32 = u32::try_from(len).map_err(|_| refused("a disk chunk"))?;
        let data = &mut self.buf[..n];
        d.file
            .read_exact_at(data, offset)
            .map_err(|e| refused(format!("reading disk {disk} at {offset:#x}: {e}")))?;
        match skip {
            Skip::Zero if data.iter().all(|&b| b == 0) => return Ok(0),
            Skip::Same(d) if base::digest(data) == *d => {
                self.skipped += len;
                return Ok(0);
            }
            _ => {}
        }
        let disk = u32::try_from(disk).map_err(|_| refused("too many disks"))?;
        self.payload.extend_from_slice(&disk.to_le_bytes());
        self.payload.extend_from_slice(&offset.to_le_bytes());
        self.payload.extend_from_slice(&len32.to_le_bytes());
        self.payload.extend_from_slice(data);
        self.chunks += 1;
        if self.payload.len() >= FRAME_BYTES {
            self.flush(ch)?;
        }
        Ok(len)
    }

    fn flush(&mut self, ch: &mut impl RunSink) -> Result<(), Error> {
        if !self.payload.is_empty() {
            ch.disk(&self.payload)?;
            self.payload.clear();
        }
        Ok(())
    }
}

/// One disk at the destination: its path, and the temporary file beside it that the source's
/// data goes into until the commit.
pub(crate) struct DiskIn {
    path: PathBuf,
    temp: PathBuf,
    file: File,
    size: u64,
    committed: bool,
}

impl DiskIn {
    /// Creates the temporary file for the disk at `path`, which must exist, be a regular file
    /// and be `size` bytes (the source's disk): the guest was built for that size.
    pub(crate) fn create(path: &Path, size: u64) -> Result<DiskIn, Error> {
        let existing = hostfs::open_regular(path, false)
            .and_then(|f| f.metadata())
            .map_err(|e| refused(format!("destination disk {}: {e}", path.display())))?;
        if existing.len() != size {
            return Err(refused(format!(
                "destination disk {} is {} bytes, the source's is {size}",
                path.display(),
                existing.len()
            )));
        }
        let name = path
            .file_name()
            .ok_or_else(|| refused(format!("disk path {} names no file", path.display())))?;
        let mut temp_name = std::ffi::OsString::from(".");
        temp_name.push(name);
        temp_name.push(format!(".migrating-{}", std::process::id()));
        remove_stale_temps(path, name);
        let temp = path.with_file_name(temp_name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&temp)
            .map_err(|e| refused(format!("cannot create {}: {e}", temp.display())))?;
        let disk = DiskIn {
            path: path.to_path_buf(),
            temp,
            file,
            size,
            committed: false,
        };
        // The replacement keeps the owner of the disk it replaces: a jailed VMM receives while
        // still root and runs the guest, which reopens its disks, as a user of its own.
        let (uid, gid) = (existing.uid(), existing.gid());
        let mine = disk
            .file
            .metadata()
            .map_err(|e| refused(format!("cannot inspect {}: {e}", disk.temp.display())))?;
        if (mine.uid(), mine.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&disk.file, Some(uid), Some(gid)).map_err(|e| {
                refused(format!(
                    "cannot give {} the owner of {}: {e}",
                    disk.temp.display(),
                    path.display()
                ))
            })?;
        }
        // A file of holes: chunks the source skipped as all zeros read as zeros.
        disk.file
            .set_len(size)
            .map_err(|e| refused(format!("cannot size {}: {e}", disk.temp.display())))?;
        Ok(disk)
    }

    /// Starts the temporary file from the disk at the path (the destination's base), and
    /// returns the digest of each of its chunks. One pass: all-zero chunks stay holes.
    pub(crate) fn start_from_base(&mut self) -> Result<Vec<Digest32>, Error> {
        let from = hostfs::open_regular(&self.path, false)
            .map_err(|e| refused(format!("base disk {}: {e}", self.path.display())))?;
        let mut buf = vec![0u8; CHUNK_LEN];
        let mut digests = Vec::new();
        let mut offset = 0;
        while offset < self.size {
            let len = (self.size - offset).min(CHUNK_SIZE);
            let data = &mut buf[..usize::try_from(len).map_err(refused)?];
            from.read_exact_at(data, offset).map_err(|e| {
                refused(format!(
                    "reading the base disk {} at {offset:#x}: {e}",
                    self.path.display()
                ))
            })?;
            if data.iter().any(|&b| b != 0) {
                self.file
                    .write_all_at(data, offset)
                    .map_err(|e| refused(format!("cannot write {}: {e}", self.temp.display())))?;
            }
            digests.push(base::digest(data));
            offset += len;
        }
        Ok(digests)
    }

    /// The temporary file the VM opens until the commit (the inode stays the same across the
    /// rename).
    pub(crate) fn temp_path(&self) -> &Path {
        &self.temp
    }

    /// The path the disk has after the commit.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Flushes the data to storage: done before `Ready`.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        self.file
            .sync_all()
            .map_err(|e| refused(format!("cannot sync {}: {e}", self.temp.display())))
    }

    /// Renames the temporary file over the disk path and syncs the directory.
    pub(crate) fn commit(&mut self) -> Result<(), Error> {
        std::fs::rename(&self.temp, &self.path)
            .map_err(|e| refused(format!("cannot replace {}: {e}", self.path.display())))?;
        self.committed = true;
        if let Some(dir) = self.path.parent() {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            hostfs::sync_dir(dir)
                .map_err(|e| refused(format!("cannot sync {}: {e}", dir.display())))?;
        }
        Ok(())
    }
}

impl Drop for DiskIn {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// Removes the temporary files an earlier receive for the disk at `path` left when it was
/// killed (`.NAME.migrating-PID` whose process is gone).
fn remove_stale_temps(path: &Path, name: &std::ffi::OsStr) {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{}.migrating-", name.to_string_lossy());
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<libc::pid_t>().ok())
            .filter(|&p| p > 0)
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Writes a `Disk` payload's runs into the temporary files of `disks`, each checked first.
/// Returns the bytes written.
pub(crate) fn apply_disk(disks: &[DiskIn], payload: &[u8]) -> Result<u64, Error> {
    let mut rest = payload;
    let mut total = 0;
    while !rest.is_empty() {
        let (head, tail) = rest
            .split_at_checked(RUN_HEADER)
            .ok_or_else(|| refused("a disk run's header is cut short"))?;
        let index = u32::from_le_bytes(head[..4].try_into().map_err(refused)?);
        let offset = u64::from_le_bytes(head[4..12].try_into().map_err(refused)?);
        let len = u32::from_le_bytes(head[12..].try_into().map_err(refused)?);
        let disk = usize::try_from(index)
            .ok()
            .and_then(|i| disks.get(i))
            .ok_or_else(|| refused(format!("a run for disk {index}, which does not exist")))?;
        let end = offset.checked_add(u64::from(len));
        if len == 0 || u64::from(len) > CHUNK_SIZE || end.is_none_or(|e| e > disk.size) {
            return Err(refused(format!(
                "a disk run at {offset:#x}+{len:#x} outside disk {index} ({} bytes)",
                disk.size
            )));
        }
        let (bytes, tail) = tail
            .split_at_checked(len as usize)
            .ok_or_else(|| refused("a disk run is cut short"))?;
        disk.file
            .write_all_at(bytes, offset)
            .map_err(|e| refused(format!("writing {}: {e}", disk.temp.display())))?;
        total += u64::from(len);
        rest = tail;
    }
    Ok(total)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::migration::wire::{Channel, Kind, Role};
    use std::os::unix::net::UnixStream;

    /// A scratch directory removed on drop.
    struct Dir(PathBuf);
    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("pv-mig-disk-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn names(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn channels() -> (Channel<UnixStream>, Channel<UnixStream>) {
        let (a, b) = UnixStream::pair().unwrap();
        let key = [7u8; 32];
        let t = std::thread::spawn(move || Channel::handshake(b, &key, Role::Destination).unwrap());
        let src = Channel::handshake(a, &key, Role::Source).unwrap();
        (src, t.join().unwrap())
    }

    /// Receives the `Disk` frames sent so far and applies them.
    fn receive_all(ch: &mut Channel<UnixStream>, frames: usize, disks: &[DiskIn]) -> u64 {
        (0..frames)
            .map(|_| {
                let f = ch.recv().unwrap();
                assert_eq!(f.kind, Kind::Disk);
                apply_disk(disks, &f.payload).unwrap()
            })
            .sum()
    }

    #[test]
    fn a_disk_arrives_whole_then_its_rewritten_chunks_and_replaces_the_path_only_at_commit() {
        let dir = Dir::new("copy");
        let src_path = dir.0.join("src.img");
        let dst_path = dir.0.join("dst.img");
        let size = 5 * CHUNK_SIZE + 4096;
        // Chunk 0 and the short last chunk hold data; the rest are zeros (skipped).
        let mut data = vec![0u8; size as usize];
        data[..100].fill(0xa1);
        data[(5 * CHUNK_SIZE) as usize..].fill(0xb2);
        std::fs::write(&src_path, &data).unwrap();
        std::fs::write(&dst_path, vec![0xeeu8; size as usize]).unwrap();

        let dirty = Arc::new(DirtyChunks::new(size));
        let out = [DiskOut::open(&src_path, dirty.clone()).unwrap()];
        let inc = [DiskIn::create(&dst_path, out[0].size()).unwrap()];
        let (mut tx, mut rx) = channels();
        let mut batch = DiskBatch::new();
        batch.send_all(&mut tx, &out, None).unwrap();
        assert_eq!(batch.chunks, 2, "all-zero chunks are not sent");
        assert_eq!(receive_all(&mut rx, 1, &inc), CHUNK_SIZE + 4096);

        // The guest writes chunk 3 meanwhile.
        let f = OpenOptions::new().write(true).open(&src_path).unwrap();
        f.write_all_at(&[0xc3; 512], 3 * CHUNK_SIZE + 512).unwrap();
        dirty.mark(3 * CHUNK_SIZE + 512, 512);
        data[(3 * CHUNK_SIZE + 512) as usize..(3 * CHUNK_SIZE + 1024) as usize].fill(0xc3);
        assert_eq!(DiskBatch::pending(&out), CHUNK_SIZE);
        assert_eq!(batch.send_dirty(&mut tx, &out).unwrap(), CHUNK_SIZE);
        receive_all(&mut rx, 1, &inc);
        assert_eq!(batch.send_dirty(&mut tx, &out).unwrap(), 0, "nothing new");

        inc[0].sync().unwrap();
        assert_eq!(
            std::fs::read(&dst_path).unwrap(),
            vec![0xeeu8; size as usize]
        );
        let mut inc = inc;
        inc[0].commit().unwrap();
        assert_eq!(std::fs::read(&dst_path).unwrap(), data);
        drop(inc);
        assert_eq!(
            dir.names(),
            ["dst.img", "src.img"],
            "no temporary file is left"
        );
    }

    #[test]
    fn onto_a_base_only_the_chunks_that_differ_are_sent_and_the_disk_arrives_whole() {
        let dir = Dir::new("base");
        let src_path = dir.0.join("src.img");
        let dst_path = dir.0.join("dst.img");
        let size = 4 * CHUNK_SIZE + 4096;
        // The destination kept the disk as it was: data in chunks 0, 2 and the short last one.
        let mut kept = vec![0u8; size as usize];
        kept[..CHUNK_SIZE as usize].fill(0x10);
        kept[(2 * CHUNK_SIZE) as usize..(3 * CHUNK_SIZE) as usize].fill(0x20);
        kept[(4 * CHUNK_SIZE) as usize..].fill(0x40);
        std::fs::write(&dst_path, &kept).unwrap();
        // Since then the source rewrote chunk 2 and zeroed chunk 0.
        let mut now = kept.clone();
        now[(2 * CHUNK_SIZE) as usize + 7] = 0x99;
        now[..CHUNK_SIZE as usize].fill(0);
        std::fs::write(&src_path, &now).unwrap();

        let out = [DiskOut::open(&src_path, Arc::new(DirtyChunks::new(size))).unwrap()];
        let mut inc = [DiskIn::create(&dst_path, size).unwrap()];
        let digests = inc[0].start_from_base().unwrap();
        assert_eq!(digests.len() as u64, out[0].chunk_count());
        assert_eq!(digests[1], base::digest(&[0u8; CHUNK_LEN]));
        let (mut tx, mut rx) = channels();
        let mut batch = DiskBatch::new();
        batch.send_all(&mut tx, &out, Some(&[digests])).unwrap();
        assert_eq!(batch.chunks, 2, "chunks 0 and 2 differ");
        assert_eq!(batch.skipped, 2 * CHUNK_SIZE + 4096);
        assert_eq!(receive_all(&mut rx, 1, &inc), 2 * CHUNK_SIZE);
        inc[0].sync().unwrap();
        inc[0].commit().unwrap();
        assert_eq!(std::fs::read(&dst_path).unwrap(), now);
    }

    #[test]
    fn runs_outside_the_disks_are_refused_and_a_dropped_copy_changes_nothing() {
        let dir = Dir::new("bounds");
        let path = dir.0.join("d.img");
        std::fs::write(&path, vec![0x11u8; 2 * CHUNK_SIZE as usize]).unwrap();
        assert!(
            DiskIn::create(&path, 3 * CHUNK_SIZE).is_err(),
            "size differs"
        );
        assert!(DiskIn::create(&dir.0.join("none.img"), CHUNK_SIZE).is_err());
        let disks = [DiskIn::create(&path, 2 * CHUNK_SIZE).unwrap()];
        let run = |disk: u32, offset: u64, len: u32, bytes: usize| {
            let mut p = disk.to_le_bytes().to_vec();
            p.extend_from_slice(&offset.to_le_bytes());
            p.extend_from_slice(&len.to_le_bytes());
            p.extend(std::iter::repeat_n(0x22u8, bytes));
            p
        };
        assert!(apply_disk(&disks, &run(0, 0, 512, 512)).is_ok());
        assert!(
            apply_disk(&disks, &run(1, 0, 512, 512)).is_err(),
            "no disk 1"
        );
        assert!(apply_disk(&disks, &run(0, 2 * CHUNK_SIZE - 256, 512, 512)).is_err());
        assert!(apply_disk(&disks, &run(0, u64::MAX - 10, 512, 512)).is_err());
        let big = CHUNK_SIZE as u32 + 512;
        assert!(apply_disk(&disks, &run(0, 0, big, big as usize)).is_err());
        assert!(apply_disk(&disks, &run(0, 0, 0, 0)).is_err());
        assert!(
            apply_disk(&disks, &run(0, 0, 512, 100)).is_err(),
            "cut short"
        );
        assert!(apply_disk(&disks, &[0u8; 7]).is_err());
        assert_eq!(
            dir.names().len(),
            2,
            "the temporary file exists until dropped"
        );
        drop(disks);
        assert_eq!(dir.names(), ["d.img"]);
        // A killed receive's leftover is removed by the next one; a live process's is kept.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        std::fs::write(dir.0.join(format!(".d.img.migrating-{dead}")), b"x").unwrap();
        std::fs::write(dir.0.join(".d.img.migrating-1"), b"x").unwrap();
        let again = DiskIn::create(&path, 2 * CHUNK_SIZE).unwrap();
        let own = format!(".d.img.migrating-{}", std::process::id());
        assert_eq!(dir.names(), [".d.img.migrating-1", own.as_str(), "d.img"]);
        drop(again);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            vec![0x11u8; 2 * CHUNK_SIZE as usize]
        );
    }
}
