//! Which regions of a disk the guest wrote: one bit per fixed-size chunk, set by the block
//! worker after a write reaches the image, taken (read and cleared) by live migration so that
//! the chunks written since the last round are sent again.
//!
//! Marking is lock-free and never allocates (an atomic OR per 64 chunks a request touches).
//! A bit set after the write completed and cleared before the chunk is read means a reader that
//! takes a bit always sees the data of every write that set it; a write completing after the
//! take sets the bit again for the next round.

use std::sync::atomic::{AtomicU64, Ordering};

/// Size of one tracked chunk in bytes.
pub const CHUNK_SIZE: u64 = 64 << 10;

/// A bitmap of the chunks of one disk written since the last [`DirtyChunks::take`].
#[derive(Debug)]
pub struct DirtyChunks {
    words: Box<[AtomicU64]>,
    disk_bytes: u64,
}

impl DirtyChunks {
    /// A clean bitmap for a disk of `disk_bytes` bytes.
    pub fn new(disk_bytes: u64) -> DirtyChunks {
        let chunks = disk_bytes.div_ceil(CHUNK_SIZE);
        let words = (0..chunks.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        DirtyChunks { words, disk_bytes }
    }

    /// Size of the tracked disk in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Number of chunks (the last one may be shorter than [`CHUNK_SIZE`]).
    pub fn chunk_count(&self) -> u64 {
        self.disk_bytes.div_ceil(CHUNK_SIZE)
    }

    /// Byte offset and length of chunk `index`, or `None` past the end of the disk.
    pub fn chunk_range(&self, index: u64) -> Option<(u64, u64)> {
        let offset = index.checked_mul(CHUNK_SIZE)?;
        if offset >= self.disk_bytes {
            return None;
        }
        Some((offset, CHUNK_SIZE.min(self.disk_bytes - offset)))
    }

    /// Marks every chunk that `len` bytes from `offset` touch. Ranges past the end of the disk
    /// are clipped (the block device refuses such requests before writing anyway).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.disk_bytes {
            return;
        }
        let end = offset.saturating_add(len).min(self.disk_bytes);
        let first = offset / CHUNK_SIZE;
        let last = (end - 1) / CHUNK_SIZE;
        let mut chunk = first;
        while chunk <= last {
            let word = (chunk / 64) as usize;
            let bit = chunk % 64;
            // Bits of this word from `bit` up to `last` (or the word's end).
            let top = (last - chunk).min(63 - bit);
            let mask = (u64::MAX >> (63 - top)) << bit;
            self.words[word].fetch_or(mask, Ordering::Release);
            chunk += top + 1;
        }
    }

    /// Marks the whole disk.
    pub fn mark_all(&self) {
        self.mark(0, self.disk_bytes);
    }

    /// Clears the bitmap and returns the indices of the chunks that were marked, in order.
    pub fn take(&self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, word) in self.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::Acquire);
            while bits != 0 {
                let bit = u64::from(bits.trailing_zeros());
                out.push(w as u64 * 64 + bit);
                bits &= bits - 1;
            }
        }
        out
    }

    /// Number of chunks currently marked (without clearing them).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_marks_exactly_the_chunks_it_touches() {
        let d = DirtyChunks::new(10 * CHUNK_SIZE);
        d.mark(CHUNK_SIZE - 512, 1024);
        assert_eq!(d.take(), vec![0, 1]);
        assert_eq!(d.take(), Vec::<u64>::new(), "take clears");
        d.mark(3 * CHUNK_SIZE, CHUNK_SIZE);
        assert_eq!(d.take(), vec![3]);
    }

    #[test]
    fn marks_span_words_and_clip_at_the_disk_end() {
        // 200 chunks: four words, the last one partly used, and a short last chunk.
        let bytes = 199 * CHUNK_SIZE + 4096;
        let d = DirtyChunks::new(bytes);
        assert_eq!(d.chunk_count(), 200);
        assert_eq!(d.chunk_range(199), Some((199 * CHUNK_SIZE, 4096)));
        assert_eq!(d.chunk_range(200), None);
        d.mark(60 * CHUNK_SIZE, 70 * CHUNK_SIZE);
        assert_eq!(d.take(), (60..130).collect::<Vec<u64>>());
        d.mark(198 * CHUNK_SIZE, u64::MAX);
        assert_eq!(d.take(), vec![198, 199]);
        d.mark(bytes, 512);
        d.mark(5, 0);
        assert_eq!(d.count(), 0);
        d.mark_all();
        assert_eq!(d.count(), 200);
        assert_eq!(d.take().len(), 200);
    }

    #[test]
    fn concurrent_marks_are_not_lost() {
        let d = std::sync::Arc::new(DirtyChunks::new(256 * CHUNK_SIZE));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let d = d.clone();
                std::thread::spawn(move || {
                    for c in (t..256).step_by(4) {
                        d.mark(c * CHUNK_SIZE, 1);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(d.take(), (0..256).collect::<Vec<u64>>());
    }
}
