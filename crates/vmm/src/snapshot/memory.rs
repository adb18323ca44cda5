//! Guest RAM in a snapshot: its layout, the runs of pages worth writing (all-zero pages are
//! skipped), and `memory.bin` written sparse and mapped back copy-on-write.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress, MmapRegion,
};

use arch::layout;
use devices::{DirtyBitmap, GuestMem};

use super::io_err;
use crate::config::VmConfig;
use crate::Error;

/// The page size of guest RAM in snapshots.
pub(crate) const PAGE: usize = 4096;
/// Guest RAM is read (and a stream's runs are bounded) in pieces of this size.
pub(crate) const CHUNK: usize = 1 << 20;
const PAGE_U64: u64 = PAGE as u64;

/// One guest RAM region and where it lives in `memory.bin`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct MemRegion {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl MemRegion {
    /// Whether `[addr, addr + len)` lies inside this region.
    pub fn holds(&self, addr: u64, len: u64) -> bool {
        let end = self.guest_addr.checked_add(self.size);
        addr >= self.guest_addr
            && addr
                .checked_add(len)
                .zip(end)
                .is_some_and(|(e, region_end)| e <= region_end)
    }
}

/// The layout of `mem` in `memory.bin`: region after region.
pub(crate) fn layout_of(mem: &GuestMem) -> Vec<MemRegion> {
    let mut offset = 0u64;
    mem.iter()
        .map(|r| {
            let m = MemRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            m
        })
        .collect()
}

/// SHA-256 of every piece of `memory.bin`: each region cut in [`CHUNK`]-byte pieces (a
/// region's last piece may be shorter), in file order, lower-case hex. Stored in `state.bin`
/// (whose body is checksummed), checked before a restore maps the file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct MemoryDigests {
    /// The piece size.
    pub chunk: u64,
    /// One digest per piece.
    pub sha256: Vec<String>,
}

/// SHA-256 of a whole [`CHUNK`] of zeros (the usual hole), known without hashing it.
const ZERO_CHUNK_SHA256: &str = "30e14955ebf1352266dc2ff8067e68104607e750abb9d3b36582b8af909fcb58";

/// Digests of all-zero pieces, by length (a region's pieces have at most two lengths).
#[derive(Default)]
struct ZeroDigests(Vec<(usize, String)>);

impl ZeroDigests {
    fn get(&mut self, n: usize) -> String {
        static ZERO: [u8; CHUNK] = [0; CHUNK];
        if n == CHUNK {
            return ZERO_CHUNK_SHA256.to_string();
        }
        if let Some((_, d)) = self.0.iter().find(|(len, _)| *len == n) {
            return d.clone();
        }
        let d = hex_digest(&ZERO[..n.min(CHUNK)]);
        self.0.push((n, d.clone()));
        d
    }
}

fn hex_digest(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// Checks `memory.bin` at `path` against `digests` without mapping it: pieces in holes must
/// be the all-zero piece, the others are read and hashed. A mismatch names where it is.
pub(super) fn verify_memory(
    path: &Path,
    regions: &[MemRegion],
    digests: &MemoryDigests,
) -> Result<(), Error> {
    let damaged = |what: String| {
        Error::Snapshot(format!(
            "{} is damaged: {what}; the snapshot is kept, nothing was restored",
            path.display()
        ))
    };
    if digests.chunk != CHUNK as u64 {
        return Err(damaged(format!(
            "its piece size {} is unknown",
            digests.chunk
        )));
    }
    let pieces: u64 = regions.iter().map(|r| r.size.div_ceil(CHUNK as u64)).sum();
    if u64::try_from(digests.sha256.len()).ok() != Some(pieces) {
        return Err(damaged("its digest list does not cover the memory".into()));
    }
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    // Every piece with where it is and whether it lies in a hole of the file, in file order.
    let mut pieces = Vec::new();
    for r in regions {
        let data = file_data_pages(&file, r.file_offset, r.size);
        let mut done = 0u64;
        while done < r.size {
            let n = usize::try_from((r.size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let first = usize::try_from(done / PAGE_U64).unwrap_or(usize::MAX);
            let in_hole = data.as_ref().is_some_and(|d| {
                d.get(first..(first + n.div_ceil(PAGE)).min(d.len()))
                    .is_some_and(|p| !p.contains(&true))
            });
            pieces.push(Piece {
                guest_addr: r.guest_addr + done,
                file_offset: r.file_offset + done,
                len: n,
                in_hole,
            });
            done += n as u64;
        }
    }
    // The pieces with data are read and hashed on a few threads (hashing is most of a
    // restore's time for a guest with real data in memory); the first bad piece is reported.
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let bad = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let (file, pieces, expected) = (&file, &pieces, &digests.sha256);
                scope.spawn(move || {
                    let mut zero = ZeroDigests::default();
                    let mut buf = vec![0u8; CHUNK];
                    for (i, p) in pieces.iter().enumerate().skip(w).step_by(workers) {
                        let got = if p.in_hole {
                            zero.get(p.len)
                        } else {
                            let chunk = &mut buf[..p.len];
                            if file.read_exact_at(chunk, p.file_offset).is_err() {
                                return Some((i, Mismatch::Short));
                            }
                            hex_digest(chunk)
                        };
                        if expected.get(i) != Some(&got) {
                            return Some((i, Mismatch::Digest));
                        }
                    }
                    None
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or(Some((0, Mismatch::Digest))))
            .min_by_key(|(i, _)| *i)
    });
    match bad {
        None => Ok(()),
        Some((_, Mismatch::Short)) => Err(damaged(
            "it is shorter than the memory it should hold".into(),
        )),
        Some((i, Mismatch::Digest)) => {
            let p = &pieces[i];
            Err(damaged(format!(
                "the {} bytes of guest memory at {:#x} (file offset {}) do not match \
                 their saved digest",
                p.len, p.guest_addr, p.file_offset
            )))
        }
    }
}

/// One piece of `memory.bin` to check.
struct Piece {
    guest_addr: u64,
    file_offset: u64,
    len: usize,
    /// Wholly in a hole of the file: it reads as zeros.
    in_hole: bool,
}

/// How a piece failed its check.
enum Mismatch {
    /// The file ends before the piece does.
    Short,
    /// Its digest is not the saved one.
    Digest,
}

/// Refuses a saved layout that is not the one the configuration's memory size gives.
pub(crate) fn check_layout(regions: &[MemRegion], cfg: &VmConfig) -> Result<(), Error> {
    let expected = layout::ram_regions(cfg.memory_mib << 20);
    let matches = expected.len() == regions.len()
        && expected
            .iter()
            .zip(regions)
            .all(|(e, r)| e.0 .0 == r.guest_addr && u64::try_from(e.1).ok() == Some(r.size));
    if matches {
        Ok(())
    } else {
        Err(Error::Snapshot(
            "the memory layout does not match the configuration".into(),
        ))
    }
}

/// For an anonymous mapping of `len` bytes at `host`: which pages the process ever touched
/// (present or swapped, from /proc/self/pagemap). An untouched anonymous page reads as zero,
/// so it need not be read at all. None when pagemap cannot be read (then every page is read).
fn touched_pages(host: u64, len: u64) -> Option<Vec<bool>> {
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const BATCH: usize = 4096;
    let f = File::open("/proc/self/pagemap").ok()?;
    let pages = usize::try_from(len.div_ceil(PAGE_U64)).ok()?;
    let mut out = Vec::with_capacity(pages);
    let mut buf = vec![0u8; 8 * BATCH];
    let mut at = (host / PAGE_U64) * 8;
    while out.len() < pages {
        let n = (pages - out.len()).min(BATCH);
        f.read_exact_at(&mut buf[..n * 8], at).ok()?;
        out.extend(buf[..n * 8].chunks_exact(8).map(|e| {
            let v = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            v & (PRESENT | SWAPPED) != 0
        }));
        at += u64::try_from(n * 8).ok()?;
    }
    Some(out)
}

/// For `len` bytes of `file` from `start`: which pages hold data (are not in a hole), from
/// lseek(SEEK_DATA/SEEK_HOLE). None if the file system cannot tell.
fn file_data_pages(file: &File, start: u64, len: u64) -> Option<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let pages = usize::try_from(len.div_ceil(PAGE_U64)).ok()?;
    let mut out = vec![false; pages];
    let end = start.checked_add(len)?;
    let mut pos = start;
    while pos < end {
        let off = libc::off_t::try_from(pos).ok()?;
        // SAFETY: lseek only reads the fd's state; the fd is open for the whole call.
        let data = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data from here to the end of the file.
            let e = std::io::Error::last_os_error();
            return (e.raw_os_error() == Some(libc::ENXIO)).then_some(out);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < data {
            return None;
        }
        let (data, hole) = (
            u64::try_from(data).ok()?,
            u64::try_from(hole).ok()?.min(end),
        );
        if data >= end {
            break;
        }
        let first = usize::try_from((data - start) / PAGE_U64).ok()?;
        let last = usize::try_from((hole - start).div_ceil(PAGE_U64))
            .ok()?
            .min(pages);
        out.iter_mut()
            .take(last)
            .skip(first)
            .for_each(|p| *p = true);
        pos = hole.max(pos + 1);
    }
    Some(out)
}

/// Which pages of region `r` may hold non-zero data (None: any page may). An anonymous page
/// the process never touched is zero; a page of a private file mapping that was never touched
/// holds the file's data, which is zero in a hole.
fn maybe_nonzero(r: &GuestRegionMmap<DirtyBitmap>) -> Option<Vec<bool>> {
    let host = r.get_host_address(MemoryRegionAddress(0)).ok()?;
    let mut pages = touched_pages(host as u64, r.len())?;
    if let Some(fo) = r.file_offset() {
        let data = file_data_pages(fo.file(), fo.start(), r.len())?;
        pages.iter_mut().zip(data).for_each(|(p, d)| *p |= d);
    }
    Some(pages)
}

/// Calls `out(region, offset, bytes)` for every run of non-zero pages of guest RAM, in
/// address order (`offset` is from the region's start; a run is at most [`CHUNK`] bytes and
/// never crosses a region). Returns the layout and the bytes handed out. With `digests`, also
/// pushes the digest of every piece (see [`MemoryDigests`]).
pub(crate) fn nonzero_runs(
    mem: &GuestMem,
    mut digests: Option<&mut Vec<String>>,
    mut out: impl FnMut(&MemRegion, u64, &[u8]) -> Result<(), Error>,
) -> Result<(Vec<MemRegion>, u64), Error> {
    let mut zero = ZeroDigests::default();
    static ZERO: [u8; PAGE] = [0; PAGE];
    let regions = layout_of(mem);
    let touched: Vec<Option<Vec<bool>>> = mem.iter().map(maybe_nonzero).collect();
    let mut buf = vec![0u8; CHUNK];
    let mut written = 0u64;
    for (r, touched) in regions.iter().zip(&touched) {
        let mut done = 0u64;
        while done < r.size {
            // At most CHUNK, a usize.
            let n = usize::try_from((r.size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            if let (Some(t), Ok(first)) = (touched, usize::try_from(done / PAGE_U64)) {
                let pages = t.get(first..(first + n.div_ceil(PAGE)).min(t.len()));
                if pages.is_some_and(|p| !p.contains(&true)) {
                    if let Some(d) = digests.as_deref_mut() {
                        d.push(zero.get(n));
                    }
                    done += n as u64;
                    continue;
                }
            }
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(|e| Error::Snapshot(format!("reading guest memory: {e}")))?;
            if let Some(d) = digests.as_deref_mut() {
                d.push(hex_digest(chunk));
            }
            // Hand out each run of non-zero pages at once.
            let mut page = 0;
            while page * PAGE < n {
                let is_zero = |p: usize| chunk[p * PAGE..((p + 1) * PAGE).min(n)] == ZERO[..];
                if is_zero(page) {
                    page += 1;
                    continue;
                }
                let start = page;
                while page * PAGE < n && !is_zero(page) {
                    page += 1;
                }
                let bytes = &chunk[start * PAGE..(page * PAGE).min(n)];
                out(r, done + (start * PAGE) as u64, bytes)?;
                written += bytes.len() as u64;
            }
            done += n as u64;
        }
    }
    Ok((regions, written))
}

/// The cipher of an encrypted snapshot's `memory.bin`: AES-256-XTS over 512-byte units, each
/// unit's file offset / 512 as the tweak (the disks' format, under a key of its own).
pub(crate) type MemoryCipher = devices::virtio::block::crypt::SectorCipher;

/// Writes guest RAM into `file`, skipping all-zero pages (they stay holes); with `cipher` the
/// other pages are written encrypted. Returns the layout, the number of bytes written and the
/// digests of the pieces (of the plaintext: see [`load_encrypted_memory`]).
pub(super) fn save_memory(
    mem: &GuestMem,
    file: &File,
    path: &Path,
    cipher: Option<&MemoryCipher>,
) -> Result<(Vec<MemRegion>, u64, MemoryDigests), Error> {
    let total: u64 = layout_of(mem).iter().map(|r| r.size).sum();
    file.set_len(total).map_err(io_err("cannot size", path))?;
    let mut sha256 = Vec::new();
    let mut sealed = Vec::new();
    let (regions, written) = nonzero_runs(mem, Some(&mut sha256), |r, offset, bytes| {
        let at = r.file_offset + offset;
        let bytes = match cipher {
            None => bytes,
            Some(c) => {
                sealed.clear();
                sealed.extend_from_slice(bytes);
                c.encrypt(&mut sealed, at / 512)
                    .map_err(|e| Error::Snapshot(format!("encrypting guest memory: {e}")))?;
                &sealed[..]
            }
        };
        file.write_all_at(bytes, at)
            .map_err(io_err("cannot write", path))
    })?;
    let digests = MemoryDigests {
        chunk: CHUNK as u64,
        sha256,
    };
    Ok((regions, written, digests))
}

/// Maps `memory.bin` privately (copy-on-write, read lazily) as guest RAM, after checking it
/// against `digests` (snapshots written before digests existed have none).
pub(super) fn load_memory(
    path: &Path,
    regions: &[MemRegion],
    cfg: &VmConfig,
    digests: Option<&MemoryDigests>,
) -> Result<GuestMem, Error> {
    check_layout(regions, cfg)?;
    if let Some(d) = digests {
        verify_memory(path, regions, d)?;
    }
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let end = r.file_offset.checked_add(r.size);
        if end.is_none_or(|e| e > len) {
            return Err(Error::Snapshot(format!(
                "{} is shorter than the memory it should hold",
                path.display()
            )));
        }
        let size = usize::try_from(r.size)
            .map_err(|_| Error::Memory(format!("region of {} bytes", r.size)))?;
        let fd = file.try_clone().map_err(io_err("cannot clone", path))?;
        let region = MmapRegion::<DirtyBitmap>::build(
            Some(FileOffset::new(fd, r.file_offset)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mapping {}: {e}", path.display())))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| Error::Memory("guest region overflows".into()))?;
        mapped.push(region);
    }
    GuestMem::from_regions(mapped).map_err(|e| Error::Memory(e.to_string()))
}

/// Reads an encrypted `memory.bin` (see [`save_memory`]) into new anonymous guest RAM: every
/// page that is not all zero in the file (a hole is an all-zero page of the guest) is
/// decrypted, and every piece's plaintext must hash to its digest. Unlike [`load_memory`],
/// nothing is mapped from the file: the guest's pages never reach it in clear.
pub(super) fn load_encrypted_memory(
    path: &Path,
    regions: &[MemRegion],
    cfg: &VmConfig,
    digests: &MemoryDigests,
    cipher: &MemoryCipher,
) -> Result<GuestMem, Error> {
    check_layout(regions, cfg)?;
    let damaged = |what: String| {
        Error::Snapshot(format!(
            "{} is damaged: {what}; the snapshot is kept, nothing was restored",
            path.display()
        ))
    };
    let pieces: u64 = regions.iter().map(|r| r.size.div_ceil(CHUNK as u64)).sum();
    if digests.chunk != CHUNK as u64 || u64::try_from(digests.sha256.len()).ok() != Some(pieces) {
        return Err(damaged("its digest list does not cover the memory".into()));
    }
    let file = File::open(path).map_err(io_err("cannot open", path))?;
    let len = file.metadata().map_err(io_err("cannot stat", path))?.len();
    let ranges = layout::ram_regions(cfg.memory_mib << 20);
    let mem = GuestMem::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
    let mut buf = vec![0u8; CHUNK];
    let mut digest = digests.sha256.iter();
    for r in regions {
        if r.file_offset.checked_add(r.size).is_none_or(|e| e > len) {
            return Err(damaged(
                "it is shorter than the memory it should hold".into(),
            ));
        }
        let mut done = 0u64;
        while done < r.size {
            let n = usize::try_from((r.size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
            let at = r.file_offset + done;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at)
                .map_err(io_err("cannot read", path))?;
            for (i, page) in chunk.chunks_mut(PAGE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    cipher
                        .decrypt(page, (at + (i * PAGE) as u64) / 512)
                        .map_err(|e| damaged(e.to_string()))?;
                }
            }
            if digest.next().map(String::as_str) != Some(hex_digest(chunk).as_str()) {
                return Err(damaged(format!(
                    "the piece at offset {at} does not decrypt to what was saved (another key?)"
                )));
            }
            mem.write_slice(chunk, GuestAddress(r.guest_addr + done))
                .map_err(|e| Error::Memory(e.to_string()))?;
            done += n as u64;
        }
    }
    Ok(mem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zero_chunk_digest_is_the_digest_of_a_zero_chunk() {
        assert_eq!(ZERO_CHUNK_SHA256, hex_digest(&vec![0u8; CHUNK]));
        let mut zero = ZeroDigests::default();
        assert_eq!(zero.get(CHUNK), ZERO_CHUNK_SHA256);
        assert_eq!(zero.get(4096), hex_digest(&[0u8; 4096]));
    }

    fn cipher(seed: u8) -> MemoryCipher {
        let key: Vec<u8> = (0..64u8)
            .map(|i| i.wrapping_mul(7).wrapping_add(seed))
            .collect();
        MemoryCipher::new(&devices::virtio::block::crypt::DiskKey::from_slice(&key).unwrap())
    }

    #[test]
    fn encrypted_memory_holds_no_plaintext_and_reads_back_only_with_its_key() {
        let mut cfg = VmConfig::new("/k".into());
        cfg.memory_mib = 4;
        let ranges = layout::ram_regions(cfg.memory_mib << 20);
        let mem = GuestMem::from_ranges(&ranges).unwrap();
        let marker = b"a secret the guest keeps in RAM";
        mem.write_slice(marker, GuestAddress(0x1000)).unwrap();
        mem.write_slice(&[0x5a; 3 * PAGE], GuestAddress(0x20_0000))
            .unwrap();
        let dir = std::env::temp_dir().join(format!("pv-encmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory.bin");
        let file = File::create(&path).unwrap();
        let (regions, written, digests) =
            save_memory(&mem, &file, &path, Some(&cipher(1))).unwrap();
        drop(file);
        assert_eq!(written, 4 * PAGE_U64, "only the non-zero pages");
        let bytes = std::fs::read(&path).unwrap();
        assert!(!bytes.windows(marker.len()).any(|w| w == marker));
        assert!(!bytes.windows(16).any(|w| w == [0x5a; 16]));
        let back = load_encrypted_memory(&path, &regions, &cfg, &digests, &cipher(1)).unwrap();
        let mut got = vec![0u8; marker.len()];
        back.read_slice(&mut got, GuestAddress(0x1000)).unwrap();
        assert_eq!(&got, marker);
        let mut page = vec![0u8; PAGE];
        back.read_slice(&mut page, GuestAddress(0x20_1000)).unwrap();
        assert!(page.iter().all(|&b| b == 0x5a));
        back.read_slice(&mut page, GuestAddress(0x30_0000)).unwrap();
        assert!(page.iter().all(|&b| b == 0), "a hole reads as zeros");
        // Another key, or a changed byte, is refused rather than run.
        let e = load_encrypted_memory(&path, &regions, &cfg, &digests, &cipher(2)).unwrap_err();
        assert!(e.to_string().contains("another key"), "{e}");
        let mut bad = bytes.clone();
        bad[0x1000] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(load_encrypted_memory(&path, &regions, &cfg, &digests, &cipher(1)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
