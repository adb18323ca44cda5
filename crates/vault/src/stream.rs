//! The chunk stream that follows the header.
//!
//! Each chunk is a little-endian `u32` whose top bit is the "last chunk" flag and whose low 31 bits
//! are the ciphertext length, followed by the ciphertext. The ciphertext seals
//! `payload || mode`, where `mode` is 0 for stored plaintext and 1 for a zstd frame; the
//! plaintext of every chunk but the last is exactly the chunk size. The nonce is the file's
//! 16-byte nonce prefix followed by the chunk index (`u64`), and the associated data is
//! `SHA-256(header) || index (u64) || last (u8)`, which binds each chunk to its file, its position
//! and its role.

use std::io::{Read, Write};

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::XNonce;

use crate::error::{Result, VaultError};
use crate::header::StreamKeys;
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

/// Seals plaintext into chunks and writes them to `out`.
pub(crate) struct ChunkWriter<W: Write> {
    out: W,
    keys: StreamKeys,
    compressor: zstd::bulk::Compressor<'static>,
    pending: Vec<u8>,
    compressed: Vec<u8>,
    record: Vec<u8>,
    index: u64,
}

impl<W: Write> ChunkWriter<W> {
    /// Starts a chunk stream right after the header.
    pub fn new(out: W, keys: StreamKeys, zstd_level: i32) -> Result<Self> {
        let compressor = zstd::bulk::Compressor::new(zstd_level)
            .map_err(|e| VaultError::io("setting up zstd", e))?;
        let chunk = keys.chunk_size as usize;
        Ok(ChunkWriter {
            out,
            keys,
            compressor,
            pending: Vec::with_capacity(chunk),
            compressed: Vec::with_capacity(zstd::zstd_safe::compress_bound(chunk)),
            record: Vec::with_capacity(chunk + 1 + TAG_LEN),
            index: 0,
        })
    }

    /// Appends plaintext to the stream.
    pub fn write_all(&mut self, mut data: &[u8]) -> Result<()> {
        let chunk = self.keys.chunk_size as usize;
        while !data.is_empty() {
            if self.pending.len() == chunk {
                self.seal(false)?;
            }
            let take = (chunk - self.pending.len()).min(data.len());
            let (now, rest) = data.split_at(take);
            self.pending.extend_from_slice(now);
            data = rest;
        }
        Ok(())
    }

    /// Seals the final chunk, flushes and returns the output.
    pub fn finish(mut self) -> Result<W> {
        self.seal(true)?;
        self.out
            .flush()
            .map_err(|e| VaultError::io("writing the profile file", e))?;
        Ok(self.out)
    }

    fn seal(&mut self, last: bool) -> Result<()> {
        self.record.clear();
        self.compressed.clear();
        let compressed_len = self
            .compressor
            .compress_to_buffer(&self.pending, &mut self.compressed)
            .ok();
        match compressed_len {
            Some(n) if n < self.pending.len() => {
                self.record.extend_from_slice(&self.compressed[..n]);
                self.record.push(MODE_ZSTD);
            }
            _ => {
                self.record.extend_from_slice(&self.pending);
                self.record.push(MODE_STORED);
            }
        }
        let ad = associated_data(&self.keys, self.index, last);
        self.keys
            .cipher
            .encrypt_in_place(&nonce(&self.keys, self.index), &ad, &mut self.record)
            .map_err(|_| VaultError::invalid_input("internal: chunk encryption failed"))?;
        // The record is at most chunk size (<= 16 MiB) + 17 bytes, far below 2^31.
        let mut word = self.record.len() as u32;
        if last {
            word |= LAST_FLAG;
        }
        let write_err = |e| VaultError::io("writing the profile file", e);
        self.out.write_all(&word.to_le_bytes()).map_err(write_err)?;
        self.out.write_all(&self.record).map_err(write_err)?;
        self.pending.clear();
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| VaultError::invalid_input("too many chunks"))?;
        Ok(())
    }
}

/// Reads, authenticates and decompresses chunks from `input`.
pub(crate) struct ChunkReader<R: Read> {
    input: R,
    keys: StreamKeys,
    decompressor: zstd::bulk::Decompressor<'static>,
    plain: Vec<u8>,
    pos: usize,
    record: Vec<u8>,
    index: u64,
    saw_last: bool,
    bytes_in: u64,
}

impl<R: Read> ChunkReader<R> {
    /// Starts reading chunks; `bytes_before` is what was already consumed (the header).
    pub fn new(input: R, keys: StreamKeys, bytes_before: u64) -> Result<Self> {
        let decompressor =
            zstd::bulk::Decompressor::new().map_err(|e| VaultError::io("setting up zstd", e))?;
        Ok(ChunkReader {
            input,
            keys,
            decompressor,
            plain: Vec::new(),
            pos: 0,
            record: Vec::new(),
            index: 0,
            saw_last: false,
            bytes_in: bytes_before,
        })
    }

    /// Bytes of the file consumed so far.
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

    fn next_chunk(&mut self) -> Result<()> {
        let index = self.index;
        let corrupt = |reason: &str| VaultError::Corrupt {
            chunk: index,
            reason: reason.into(),
        };
        let mut word = [0u8; 4];
        if read_up_to(&mut self.input, &mut word)? < word.len() {
            return Err(VaultError::Truncated);
        }
        let word = u32::from_le_bytes(word);
        let last = word & LAST_FLAG != 0;
        let len = (word & !LAST_FLAG) as usize;
        let chunk = self.keys.chunk_size as usize;
        if !(1 + TAG_LEN..=chunk + 1 + TAG_LEN).contains(&len) {
            return Err(corrupt("chunk length out of range"));
        }
        self.record.resize(len, 0);
        if read_up_to(&mut self.input, &mut self.record)? < len {
            return Err(VaultError::Truncated);
        }
        self.bytes_in += 4 + len as u64;

        let ad = associated_data(&self.keys, index, last);
        self.keys
            .cipher
            .decrypt_in_place(&nonce(&self.keys, index), &ad, &mut self.record)
            .map_err(|_| corrupt("authentication failed"))?;
        let (mode, payload) = self
            .record
            .split_last()
            .ok_or_else(|| corrupt("empty chunk"))?;
        self.plain.clear();
        self.pos = 0;
        match *mode {
            MODE_STORED => {
                if payload.len() > chunk {
                    return Err(corrupt("chunk larger than the chunk size"));
                }
                self.plain.extend_from_slice(payload);
            }
            MODE_ZSTD => {
                self.plain.reserve(chunk);
                self.decompressor
                    .decompress_to_buffer(payload, &mut self.plain)
                    .map_err(|_| corrupt("decompression failed"))?;
                if self.plain.len() > chunk {
                    return Err(corrupt("chunk larger than the chunk size"));
                }
            }
            _ => return Err(corrupt("unknown chunk encoding")),
        }
        if !last && self.plain.len() != chunk {
            return Err(corrupt("short chunk before the last one"));
        }
        self.index = index
            .checked_add(1)
            .ok_or_else(|| corrupt("too many chunks"))?;
        if last {
            self.saw_last = true;
            let mut extra = [0u8; 1];
            if read_up_to(&mut self.input, &mut extra)? != 0 {
                return Err(VaultError::TrailingData);
            }
        }
        Ok(())
    }
}
