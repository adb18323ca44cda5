//! The chunk stream that follows the header.
//!
//! Each chunk is a little-endian `u32` whose top bit is the "last chunk" flag and whose low 31 bits
//! are the ciphertext length, followed by the ciphertext. The ciphertext seals
//! `payload || mode`, where `mode` is 0 for stored plaintext and 1 for a zstd frame; the
//! plaintext of every chunk but the last is exactly the chunk size. The nonce is the file's
//! 16-byte nonce prefix followed by the chunk index (`u64`), and the associated data is
//! `SHA-256(header) || index (u64) || last (u8)`, which binds each chunk to its file, its position
//! and its role.
//!
//! Chunks are independent, so both directions spread them over a few worker threads (see
//! [`crate::pipeline`]) while the calling thread reads and writes them in order.

use std::io::{Read, Write};
use std::sync::Arc;

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{Tag, XNonce};

use crate::error::{Result, VaultError};
use crate::header::StreamKeys;
use crate::pipeline::{window, OrderedPool, Worker};
use crate::util::read_up_to;

const TAG_LEN: usize = 16;
const LAST_FLAG: u32 = 1 << 31;
const MODE_STORED: u8 = 0;
const MODE_ZSTD: u8 = 1;

fn nonce(keys: &StreamKeys, index: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(&keys.nonce_prefix);
    n[16..].copy_from_slice(&index.to_le_bytes());
    XNonce::from(n)
}

fn associated_data(keys: &StreamKeys, index: u64, last: bool) -> [u8; 41] {
    let mut ad = [0u8; 41];
    ad[..32].copy_from_slice(&keys.header_hash);
    ad[32..40].copy_from_slice(&index.to_le_bytes());
    ad[40] = u8::from(last);
    ad
}

/// A chunk's plaintext on its way to be sealed, or its record on its way to be opened.
struct ChunkJob {
    index: u64,
    last: bool,
    /// Plaintext: the input of sealing, the output of opening.
    plain: Vec<u8>,
    /// The record: sealing writes the length word and the ciphertext; opening reads the
    /// ciphertext (without the word).
    record: Vec<u8>,
}

impl ChunkJob {
    fn buffers(self) -> (Vec<u8>, Vec<u8>) {
        (self.plain, self.record)
    }
}

/// Compresses and seals chunks on one worker thread.
struct Sealer {
    keys: Arc<StreamKeys>,
    compressor: zstd::bulk::Compressor<'static>,
    compressed: Vec<u8>,
}

impl Worker for Sealer {
    type Job = ChunkJob;
    type Out = Result<ChunkJob>;

    /// Fills `record` with the length word and the sealed `payload || mode` of `plain`.
    fn run(&mut self, mut job: ChunkJob) -> Result<ChunkJob> {
        let record = &mut job.record;
        record.clear();
        record.extend_from_slice(&[0u8; 4]);
        self.compressed.clear();
        let compressed_len = self
            .compressor
            .compress_to_buffer(&job.plain, &mut self.compressed)
            .ok();
        match compressed_len {
            Some(n) if n < job.plain.len() => {
                record.extend_from_slice(&self.compressed[..n]);
                record.push(MODE_ZSTD);
            }
            _ => {
                record.extend_from_slice(&job.plain);
                record.push(MODE_STORED);
            }
        }
        let ad = associated_data(&self.keys, job.index, job.last);
        let tag = self
            .keys
            .cipher
            .encrypt_in_place_detached(&nonce(&self.keys, job.index), &ad, &mut record[4..])
            .map_err(|_| VaultError::invalid_input("internal: chunk encryption failed"))?;
        record.extend_from_slice(&tag);
        // At most the chunk size (<= 16 MiB) + 17 bytes, far below the flag bit.
        let mut word = u32::try_from(record.len() - 4)
            .ok()
            .filter(|n| n & LAST_FLAG == 0)
            .ok_or_else(|| VaultError::invalid_input("internal: chunk record too large"))?;
        if job.last {
            word |= LAST_FLAG;
        }
        record[..4].copy_from_slice(&word.to_le_bytes());
        Ok(job)
    }
}

/// Seals plaintext into chunks on a few worker threads and writes them, in order, to `out`.
pub(crate) struct ChunkWriter<W: Write> {
    out: W,
    pool: OrderedPool<Sealer>,
    chunk: usize,
    /// The chunk being filled: always `chunk` bytes long, of which `filled` are data.
    pending: Vec<u8>,
    filled: usize,
    index: u64,
    /// Buffers of written chunks, for reuse.
    spare: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<W: Write> ChunkWriter<W> {
    /// Starts a chunk stream right after the header, sealing on `threads` worker threads
    /// (0: on the calling thread).
    pub fn new(out: W, keys: StreamKeys, zstd_level: i32, threads: usize) -> Result<Self> {
        let chunk = keys.chunk_size as usize;
        let keys = Arc::new(keys);
        let pool = OrderedPool::new(threads, window(threads, chunk), || {
            Ok(Sealer {
                keys: Arc::clone(&keys),
                compressor: zstd::bulk::Compressor::new(zstd_level)?,
                compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk)),
            })
        })
        .map_err(|e| VaultError::io("setting up the compression threads", e))?;
        Ok(ChunkWriter {
            out,
            pool,
            chunk,
            pending: vec![0; chunk],
            filled: 0,
            index: 0,
            spare: Vec::new(),
        })
    }

    /// Appends plaintext to the stream.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let n = self.write_with(data.len(), |room| {
                room.copy_from_slice(&data[..room.len()]);
                Ok(room.len())
            })?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Appends plaintext that `fill` writes straight into the chunk buffer (no copy): it gets
    /// room for at most `max` bytes and returns how many it wrote, which this returns.
    pub fn write_with(
        &mut self,
        max: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<usize>,
    ) -> Result<usize> {
        if self.filled == self.chunk {
            self.dispatch(false)?;
        }
        let end = self.filled + max.min(self.chunk - self.filled);
        let room = &mut self.pending[self.filled..end];
        let n = fill(room)?.min(end - self.filled);
        self.filled += n;
        Ok(n)
    }

    /// Seals the final chunk, writes what is in flight, flushes and returns the output.
    pub fn finish(mut self) -> Result<W> {
        self.dispatch(true)?;
        while self.pool.in_flight() > 0 {
            self.write_one()?;
        }
        self.out
            .flush()
            .map_err(|e| VaultError::io("writing the profile file", e))?;
        Ok(self.out)
    }

    /// Hands the pending plaintext to the workers as chunk `index`.
    fn dispatch(&mut self, last: bool) -> Result<()> {
        if self.pool.is_full() {
            self.write_one()?;
        }
        let (mut fresh, record) = self.spare.pop().unwrap_or_default();
        // Reused buffers are already `chunk` long unless they held a short chunk.
        fresh.resize(self.chunk, 0);
        let mut plain = std::mem::replace(&mut self.pending, fresh);
        plain.truncate(self.filled);
        self.filled = 0;
        self.pool.submit(ChunkJob {
            index: self.index,
            last,
            plain,
            record,
        });
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| VaultError::invalid_input("too many chunks"))?;
        Ok(())
    }

    /// Writes the oldest chunk in flight once it is sealed.
    fn write_one(&mut self) -> Result<()> {
        let Some(sealed) = self.pool.next() else {
            return Ok(());
        };
        let sealed = sealed?;
        self.out
            .write_all(&sealed.record)
            .map_err(|e| VaultError::io("writing the profile file", e))?;
        self.spare.push(sealed.buffers());
        Ok(())
    }
}

/// Authenticates and decompresses chunks on one worker thread.
struct Opener {
    keys: Arc<StreamKeys>,
    decompressor: zstd::bulk::Decompressor<'static>,
}

impl Worker for Opener {
    type Job = ChunkJob;
    type Out = Result<ChunkJob>;

    /// Opens `record` (ciphertext and tag) into `plain`, checking its size.
    fn run(&mut self, mut job: ChunkJob) -> Result<ChunkJob> {
        let index = job.index;
        let corrupt = |reason: &str| VaultError::Corrupt {
            chunk: index,
            reason: reason.into(),
        };
        let chunk = self.keys.chunk_size as usize;
        let tag_at = job
            .record
            .len()
            .checked_sub(TAG_LEN)
            .ok_or_else(|| corrupt("chunk length out of range"))?;
        let (body, tag) = job.record.split_at_mut(tag_at);
        let ad = associated_data(&self.keys, index, job.last);
        self.keys
            .cipher
            .decrypt_in_place_detached(&nonce(&self.keys, index), &ad, body, Tag::from_slice(tag))
            .map_err(|_| corrupt("authentication failed"))?;
        let (mode, payload) = body.split_last().ok_or_else(|| corrupt("empty chunk"))?;
        job.plain.clear();
        match *mode {
            MODE_STORED => {
                if payload.len() > chunk {
                    return Err(corrupt("chunk larger than the chunk size"));
                }
                job.plain.extend_from_slice(payload);
            }
            MODE_ZSTD => {
                job.plain.reserve(chunk);
                self.decompressor
                    .decompress_to_buffer(payload, &mut job.plain)
                    .map_err(|_| corrupt("decompression failed"))?;
                if job.plain.len() > chunk {
                    return Err(corrupt("chunk larger than the chunk size"));
                }
            }
            _ => return Err(corrupt("unknown chunk encoding")),
        }
        if !job.last && job.plain.len() != chunk {
            return Err(corrupt("short chunk before the last one"));
        }
        Ok(job)
    }
}

/// Reads chunks from `input` and authenticates and decompresses them on a few worker threads,
/// handing out the plaintext in order.
///
/// Records are read ahead (a few chunks); a problem found while reading (truncation, a bad
/// length, bytes after the last chunk) is reported only once every chunk before it has been
/// opened, so errors come in the same order as from a one-chunk-at-a-time reader.
pub(crate) struct ChunkReader<R: Read> {
    input: R,
    pool: OrderedPool<Opener>,
    chunk: usize,
    /// Index of the next record to read from `input`.
    read_index: u64,
    /// No more records will be read: the last one was read, or reading failed.
    input_done: bool,
    /// Why reading failed at chunk `read_index`.
    read_error: Option<VaultError>,
    /// What is wrong after the last chunk (trailing bytes), reported once it is opened.
    after_last: Option<VaultError>,
    plain: Vec<u8>,
    pos: usize,
    /// Chunks handed out so far.
    index: u64,
    saw_last: bool,
    bytes_in: u64,
    /// Buffers of consumed chunks, for reuse.
    spare: Vec<(Vec<u8>, Vec<u8>)>,
}

impl<R: Read> ChunkReader<R> {
    /// Starts reading chunks; `bytes_before` is what was already consumed (the header). Chunks
    /// are opened on `threads` worker threads (0: on the calling thread, one at a time).
    pub fn new(input: R, keys: StreamKeys, bytes_before: u64, threads: usize) -> Result<Self> {
        let chunk = keys.chunk_size as usize;
        let keys = Arc::new(keys);
        let pool = OrderedPool::new(threads, window(threads, chunk), || {
            Ok(Opener {
                keys: Arc::clone(&keys),
                decompressor: zstd::bulk::Decompressor::new()?,
            })
        })
        .map_err(|e| VaultError::io("setting up the decompression threads", e))?;
        Ok(ChunkReader {
            input,
            pool,
            chunk,
            read_index: 0,
            input_done: false,
            read_error: None,
            after_last: None,
            plain: Vec::new(),
            pos: 0,
            index: 0,
            saw_last: false,
            bytes_in: bytes_before,
            spare: Vec::new(),
        })
    }

    /// Bytes of the file consumed so far (the chunks handed out, not those read ahead).
    pub fn bytes_in(&self) -> u64 {
        self.bytes_in
    }

    /// Index of the chunk the next plaintext byte comes from (for error reports).
    pub fn current_chunk(&self) -> u64 {
        self.index.saturating_sub(1)
    }

    /// Returns up to `max` plaintext bytes; an empty slice means the stream has ended.
    pub fn read_some(&mut self, max: usize) -> Result<&[u8]> {
        while self.pos == self.plain.len() {
            if self.saw_last {
                return Ok(&[]);
            }
            self.next_chunk()?;
        }
        let n = max.min(self.plain.len() - self.pos);
        let start = self.pos;
        self.pos += n;
        Ok(&self.plain[start..start + n])
    }

    /// Fills `buf` with plaintext; the stream ending first is corruption.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            let part = self.read_some(buf.len() - filled)?;
            if part.is_empty() {
                return Err(VaultError::Corrupt {
                    chunk: self.current_chunk(),
                    reason: "the decrypted data ends early".into(),
                });
            }
            let n = part.len();
            buf[filled..filled + n].copy_from_slice(part);
            filled += n;
        }
        Ok(())
    }

    /// Checks that no plaintext is left and that the file ends right after its last chunk.
    pub fn finish(mut self) -> Result<()> {
        if !self.read_some(1)?.is_empty() {
            return Err(VaultError::Corrupt {
                chunk: self.current_chunk(),
                reason: "unexpected data after the last entry".into(),
            });
        }
        Ok(())
    }

    /// Makes the next chunk's plaintext current.
    fn next_chunk(&mut self) -> Result<()> {
        while !self.input_done && !self.pool.is_full() {
            self.read_record();
        }
        let opened = match self.pool.next() {
            Some(opened) => opened?,
            None => {
                return Err(self.read_error.take().unwrap_or(VaultError::Corrupt {
                    chunk: self.read_index,
                    reason: "internal: no chunk to read".into(),
                }))
            }
        };
        self.bytes_in += 4 + opened.record.len() as u64;
        self.index = opened.index + 1;
        let last = opened.last;
        let (plain, record) = opened.buffers();
        let old = std::mem::replace(&mut self.plain, plain);
        self.pos = 0;
        self.spare.push((old, record));
        if last {
            self.saw_last = true;
            if let Some(e) = self.after_last.take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Reads the next record and queues it for opening; a failure stops the reading.
    fn read_record(&mut self) {
        if let Err(e) = self.try_read_record() {
            self.input_done = true;
            self.read_error = Some(e);
        }
    }

    fn try_read_record(&mut self) -> Result<()> {
        let index = self.read_index;
        let mut word = [0u8; 4];
        if read_up_to(&mut self.input, &mut word)? < word.len() {
            return Err(VaultError::Truncated);
        }
        let word = u32::from_le_bytes(word);
        let last = word & LAST_FLAG != 0;
        let len = (word & !LAST_FLAG) as usize;
        if !(1 + TAG_LEN..=self.chunk + 1 + TAG_LEN).contains(&len) {
            return Err(VaultError::Corrupt {
                chunk: index,
                reason: "chunk length out of range".into(),
            });
        }
        let next_index = index.checked_add(1).ok_or_else(|| VaultError::Corrupt {
            chunk: index,
            reason: "too many chunks".into(),
        })?;
        let (plain, mut record) = self.spare.pop().unwrap_or_default();
        record.resize(len, 0);
        if read_up_to(&mut self.input, &mut record)? < len {
            return Err(VaultError::Truncated);
        }
        if last {
            self.input_done = true;
            let mut extra = [0u8; 1];
            match read_up_to(&mut self.input, &mut extra) {
                Ok(0) => {}
                Ok(_) => self.after_last = Some(VaultError::TrailingData),
                Err(e) => self.after_last = Some(e),
            }
        }
        self.pool.submit(ChunkJob {
            index,
            last,
            plain,
            record,
        });
        self.read_index = next_index;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header;
    use crate::keys::{KdfParams, KeySpec, Passphrase, ReadLimits, Unlock};

    const CHUNK: u32 = 1024;

    /// A header and a way to get its stream keys again (the same keys for every writer).
    fn header_bytes() -> Vec<u8> {
        let spec = KeySpec::Passphrase {
            passphrase: Passphrase::new("pw"),
            params: KdfParams::INSECURE_FAST,
        };
        header::create(&[spec], CHUNK).unwrap().0
    }

    fn keys_of(header_bytes: &[u8]) -> StreamKeys {
        let unlock = Unlock::Passphrase(Passphrase::new("pw"));
        header::open(&mut &header_bytes[..], &unlock, &ReadLimits::default())
            .unwrap()
            .keys
    }

    /// Compressible and incompressible stretches, not a multiple of the chunk size.
    fn plaintext() -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut data = Vec::new();
        for block in 0..40u64 {
            for _ in 0..1000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                data.push(if block % 3 == 0 {
                    0
                } else {
                    x.to_le_bytes()[3]
                });
            }
        }
        data.extend_from_slice(b"tail");
        data
    }

    fn seal(header_bytes: &[u8], data: &[u8], threads: usize) -> Vec<u8> {
        let mut writer = ChunkWriter::new(Vec::new(), keys_of(header_bytes), 3, threads).unwrap();
        // Uneven pieces, so chunk boundaries fall inside writes.
        for piece in data.chunks(777) {
            writer.write_all(piece).unwrap();
        }
        writer.finish().unwrap()
    }

    fn open(header_bytes: &[u8], sealed: &[u8], threads: usize) -> Result<Vec<u8>> {
        let mut reader = ChunkReader::new(sealed, keys_of(header_bytes), 0, threads)?;
        let mut out = Vec::new();
        loop {
            let part = reader.read_some(500)?;
            if part.is_empty() {
                break;
            }
            out.extend_from_slice(part);
        }
        assert_eq!(reader.bytes_in(), sealed.len() as u64);
        reader.finish()?;
        Ok(out)
    }

    #[test]
    fn the_stream_is_the_same_whatever_the_thread_count() {
        let header_bytes = header_bytes();
        let data = plaintext();
        let reference = seal(&header_bytes, &data, 0);
        assert!(reference.len() > 20 * 4, "want many chunks");
        for threads in [1, 2, 4] {
            assert!(
                seal(&header_bytes, &data, threads) == reference,
                "{threads} threads seal differently"
            );
        }
        for threads in [0, 1, 2, 4] {
            assert!(open(&header_bytes, &reference, threads).unwrap() == data);
        }
    }

    #[test]
    fn reading_errors_are_the_same_whatever_the_thread_count() {
        let header_bytes = header_bytes();
        let sealed = seal(&header_bytes, &plaintext(), 0);
        let mut bad_files = Vec::new();
        for pos in (0..sealed.len()).step_by(997) {
            let mut flipped = sealed.clone();
            flipped[pos] ^= 0x10;
            bad_files.push(flipped);
        }
        for len in (0..sealed.len()).step_by(1013) {
            bad_files.push(sealed[..len].to_vec());
        }
        let mut trailing = sealed.clone();
        trailing.push(0);
        bad_files.push(trailing);
        for bad in &bad_files {
            let expected = open(&header_bytes, bad, 0).unwrap_err().to_string();
            for threads in [1, 2, 4] {
                let got = open(&header_bytes, bad, threads).unwrap_err().to_string();
                assert_eq!(got, expected, "{threads} threads");
            }
        }
    }
}
