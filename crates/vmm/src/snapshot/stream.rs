//! A snapshot as one byte stream (a pipe, a socket: live migration), with the same checks as
//! a snapshot directory.
//!
//! ```text
//! header:   magic "PVSTREAM" | stream version u32 | state length u64
//! state:    a whole `state.bin` container (see [`super::format`]: versioned, checksummed)
//! memory:   run*, then an end marker: guest address u64::MAX | length 0
//! run:      guest address u64 | length u32 (1..=1 MiB, inside one RAM region) | bytes
//! trailer:  SHA-256 of everything before it
//! ```
//!
//! Integers are little-endian. Pages not sent are zero. A reader refuses the stream (before
//! any vCPU exists) on a bad header, a damaged state, a run outside guest RAM, or a trailer
//! that does not match what it read.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use devices::GuestMem;

use super::format;
use super::memory::{check_layout, nonzero_runs, MemRegion, CHUNK};
use crate::config::VmConfig;
use crate::Error;

/// First eight bytes of a snapshot stream.
pub const STREAM_MAGIC: [u8; 8] = *b"PVSTREAM";
/// The stream version this build writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Guest address of the end marker.
const END: u64 = u64::MAX;
/// Largest state container a reader accepts.
const MAX_STATE: u64 = format::MAX_BODY + format::HEADER_LEN as u64;

fn stream_err(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Snapshot(format!("snapshot stream: {what}: {e}"))
}

fn damaged(why: impl std::fmt::Display) -> Error {
    Error::Snapshot(format!("snapshot stream refused: {why}"))
}

/// A writer that hashes everything it passes on.
struct Hashing<'a> {
    inner: &'a mut dyn Write,
    hash: Sha256,
}

impl Hashing<'_> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.hash.update(bytes);
        self.inner
            .write_all(bytes)
            .map_err(stream_err("cannot write"))
    }
}

/// Writes the header, `state` (a finished `state.bin` container), the non-zero pages of
/// `mem` and the trailer into `w`. Returns the bytes of guest RAM sent.
pub(super) fn write(w: &mut dyn Write, state: &[u8], mem: &GuestMem) -> Result<u64, Error> {
    let mut h = Hashing {
        inner: w,
        hash: Sha256::new(),
    };
    h.put(&STREAM_MAGIC)?;
    h.put(&STREAM_VERSION.to_le_bytes())?;
    h.put(&(state.len() as u64).to_le_bytes())?;
    h.put(state)?;
    let (_, sent) = nonzero_runs(mem, None, |r, offset, bytes| {
        // Runs are at most CHUNK (1 MiB) long.
        let len = u32::try_from(bytes.len()).map_err(|_| damaged("oversized run"))?;
        h.put(&(r.guest_addr + offset).to_le_bytes())?;
        h.put(&len.to_le_bytes())?;
        h.put(bytes)
    })?;
    h.put(&END.to_le_bytes())?;
    h.put(&0u32.to_le_bytes())?;
    let digest = h.hash.finalize();
    h.inner
        .write_all(&digest)
        .and_then(|()| h.inner.flush())
        .map_err(stream_err("cannot write"))?;
    Ok(sent)
}

/// Reads a snapshot stream: first the header and state, then (once the caller has checked
/// the state) guest RAM and the trailer.
pub(super) struct StreamReader<'a> {
    inner: &'a mut dyn Read,
    hash: Sha256,
}

impl<'a> StreamReader<'a> {
    /// Starts reading `r`.
    pub fn new(r: &'a mut dyn Read) -> Self {
        StreamReader {
            inner: r,
            hash: Sha256::new(),
        }
    }

    fn take(&mut self, buf: &mut [u8]) -> Result<(), Error> {
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                damaged("it ends early")
            } else {
                stream_err("cannot read")(e)
            }
        })?;
        self.hash.update(&*buf);
        Ok(())
    }

    fn u32(&mut self) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.take(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.take(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The header and the `state.bin` container (not yet checked: see [`format::read`]).
    pub fn state(&mut self) -> Result<Vec<u8>, Error> {
        let mut magic = [0u8; 8];
        self.take(&mut magic)?;
        if magic != STREAM_MAGIC {
            return Err(damaged("not a pocketvisor snapshot stream (bad magic)"));
        }
        let version = self.u32()?;
        if version != STREAM_VERSION {
            return Err(damaged(format!(
                "stream version {version} (this build reads version {STREAM_VERSION})"
            )));
        }
        let len = self.u64()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|_| len <= MAX_STATE)
            .ok_or_else(|| damaged(format!("a state of {len} bytes")))?;
        let mut state = vec![0u8; len];
        self.take(&mut state)?;
        Ok(state)
    }

    /// Guest RAM laid out as `regions` (checked against `cfg`), filled from the stream's
    /// runs; then the trailer must match everything read.
    pub fn memory(mut self, regions: &[MemRegion], cfg: &VmConfig) -> Result<GuestMem, Error> {
        check_layout(regions, cfg)?;
        let ranges = arch::layout::ram_regions(cfg.memory_mib << 20);
        let mem = GuestMem::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let addr = self.u64()?;
            let len = self.u32()?;
            if addr == END && len == 0 {
                break;
            }
            let n = usize::try_from(len)
                .ok()
                .filter(|&n| n > 0 && n <= CHUNK)
                .ok_or_else(|| damaged(format!("a memory run of {len} bytes")))?;
            if !regions.iter().any(|r| r.holds(addr, u64::from(len))) {
                return Err(damaged(format!(
                    "a memory run at {addr:#x}+{len:#x} outside guest RAM"
                )));
            }
            let chunk = &mut buf[..n];
            self.take(chunk)?;
            mem.write_slice(chunk, GuestAddress(addr))
                .map_err(|e| damaged(format!("a memory run at {addr:#x}: {e}")))?;
        }
        let expected = self.hash.finalize();
        let mut trailer = [0u8; 32];
        self.inner
            .read_exact(&mut trailer)
            .map_err(|_| damaged("it ends before its checksum"))?;
        if trailer[..] != expected[..] {
            return Err(damaged("checksum mismatch (the stream is corrupted)"));
        }
        // What was loaded is the starting point, not a change since.
        for r in vm_memory::GuestMemoryBackend::iter(&mem) {
            vm_memory::MmapRegion::bitmap(r).reset();
        }
        Ok(mem)
    }
}
