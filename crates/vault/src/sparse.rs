//! Sparse files: finding data extents on export and keeping holes on import.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::manifest::Extent;

/// Most extents recorded for one entry; beyond that, nearby extents are merged.
const MAX_EXPORT_EXTENTS: usize = 100_000;
/// Block granularity at which the importer skips writing zeros.
const ZERO_BLOCK: u64 = 4096;

/// Lists the data extents of the first `len` bytes of `file` with `SEEK_DATA`/`SEEK_HOLE`.
///
/// A file system without hole reporting yields one extent covering the whole file.
pub(crate) fn data_extents(file: &File, len: u64) -> io::Result<Vec<Extent>> {
    let whole = || {
        if len == 0 {
            Vec::new()
        } else {
            vec![Extent {
                offset: 0,
                length: len,
            }]
        }
    };
    let fd = file.as_raw_fd();
    let mut extents: Vec<Extent> = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(data) = seek(fd, pos, libc::SEEK_DATA)? else {
            break;
        };
        if data == u64::MAX {
            return Ok(whole());
        }
        if data >= len {
            break;
        }
        let hole = match seek(fd, data, libc::SEEK_HOLE)? {
            Some(h) if h != u64::MAX => h.min(len),
            _ => len,
        };
        if hole <= data {
            // The file changed under us; be safe and store everything from here.
            extents.push(Extent {
                offset: data,
                length: len - data,
            });
            break;
        }
        extents.push(Extent {
            offset: data,
            length: hole - data,
        });
        pos = hole;
    }
    Ok(coalesce(extents, MAX_EXPORT_EXTENTS))
}

/// `lseek` wrapper: `Ok(None)` for ENXIO (no more data), `Ok(Some(u64::MAX))` when the file
/// system does not support the whence value.
fn seek(fd: libc::c_int, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let offset = libc::off_t::try_from(pos)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek only reads the descriptor and integers; `fd` is a descriptor owned by a
    // live `File` borrowed by the caller for the duration of the call.
    let r = unsafe { libc::lseek(fd, offset, whence) };
    if r < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(u64::MAX)),
            _ => Err(err),
        };
    }
    // `r` is non-negative here.
    Ok(Some(r as u64))
}

/// Merges extents separated by the smallest gaps until at most `max` remain.
fn coalesce(mut extents: Vec<Extent>, max: usize) -> Vec<Extent> {
    let mut gap = 64 * 1024u64;
    while extents.len() > max {
        let mut merged: Vec<Extent> = Vec::with_capacity(extents.len());
        for e in extents {
            match merged.last_mut() {
                Some(prev) if e.offset - (prev.offset + prev.length) <= gap => {
                    prev.length = e.offset + e.length - prev.offset;
                }
                _ => merged.push(e),
            }
        }
        extents = merged;
        gap = gap.saturating_mul(2);
    }
    extents
}

/// Writes `data` at `offset` into a file whose unwritten bytes read as zero, skipping aligned
/// all-zero blocks so that they stay holes.
pub(crate) fn write_skipping_zeros(file: &File, offset: u64, data: &[u8]) -> io::Result<()> {
    let mut i = 0usize;
    let mut run_start: Option<usize> = None;
    while i < data.len() {
        let abs = offset + i as u64;
        let to_boundary = ZERO_BLOCK - abs % ZERO_BLOCK;
        let take = usize::try_from(to_boundary)
            .unwrap_or(usize::MAX)
            .min(data.len() - i);
        let piece = &data[i..i + take];
        let skip = take as u64 == ZERO_BLOCK && piece.iter().all(|&b| b == 0);
        if skip {
            if let Some(start) = run_start.take() {
                file.write_all_at(&data[start..i], offset + start as u64)?;
            }
        } else if run_start.is_none() {
            run_start = Some(i);
        }
        i += take;
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn finds_written_extents_of_a_sparse_file() {
        let file = tempfile::tempfile().unwrap();
        let len = 16 * 1024 * 1024;
        file.set_len(len).unwrap();
        file.write_all_at(&[1u8; 8192], 1024 * 1024).unwrap();
        file.write_all_at(&[2u8; 4096], 8 * 1024 * 1024).unwrap();
        let extents = data_extents(&file, len).unwrap();
        let stored: u64 = extents.iter().map(|e| e.length).sum();
        if file.metadata().unwrap().blocks() * 512 >= len {
            // The temp file system does not do holes; nothing more to check.
            return;
        }
        assert!(!extents.is_empty());
        assert!(stored < 1024 * 1024, "stored {stored} bytes: {extents:?}");
        assert!(extents
            .iter()
            .any(|e| e.offset <= 1024 * 1024 && e.offset + e.length >= 1024 * 1024 + 8192));
        assert!(extents
            .iter()
            .any(|e| e.offset <= 8 * 1024 * 1024 && e.offset + e.length >= 8 * 1024 * 1024 + 4096));
    }

    #[test]
    fn empty_file_has_no_extents() {
        let file = tempfile::tempfile().unwrap();
        assert!(data_extents(&file, 0).unwrap().is_empty());
    }

    #[test]
    fn coalesce_merges_small_gaps() {
        let extents: Vec<Extent> = (0..10)
            .map(|i| Extent {
                offset: i * 10_000,
                length: 100,
            })
            .collect();
        let merged = coalesce(extents, 3);
        assert_eq!(
            merged,
            vec![Extent {
                offset: 0,
                length: 90_100
            }]
        );
    }

    #[test]
    fn zero_blocks_are_skipped_and_data_is_kept() {
        let file = tempfile::tempfile().unwrap();
        let len: usize = 64 * 4096;
        file.set_len(len as u64).unwrap();
        let mut data = vec![0u8; 40 * 4096 + 100];
        data[10] = 7;
        data[20 * 4096 + 5] = 9;
        data[40 * 4096 + 99] = 3;
        write_skipping_zeros(&file, 4000, &data).unwrap();
        let mut back = vec![0u8; len];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[4000..4000 + data.len()], &data[..]);
        assert!(back[..4000].iter().all(|&b| b == 0));
        assert!(back[4000 + data.len()..].iter().all(|&b| b == 0));
        // Only a few blocks are allocated (where supported).
        assert!(file.metadata().unwrap().blocks() * 512 < 16 * 4096);
    }
}
