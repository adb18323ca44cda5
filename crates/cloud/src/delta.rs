//! What a return must send: the SHA-256 of every chunk of a memory image or disk as the device
//! kept it ([`Manifest`]), and the chunks whose hash now differs ([`Manifest::changed`]).
//!
//! The device hashes its kept copy when the profile leaves and sends the manifest with the
//! return; the cloud host sends back only the chunks that differ. A manifest comes from the
//! other side: [`Manifest::from_bytes`] checks its shape, and the transport (the migration
//! channel, HMAC-framed) authenticates it before it is parsed.

use std::io::Read;

use sha2::{Digest, Sha256};

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    /// Not a manifest this code wrote.
    #[error("malformed manifest: {0}")]
    Malformed(&'static str),
    /// The two sides do not describe the same image.
    #[error("manifests of different images: {0}")]
    Mismatch(&'static str),
}

/// Chunk sizes a manifest may use: a page up to 1 MiB, a power of two.
pub const MIN_CHUNK: u32 = 4096;
/// See [`MIN_CHUNK`].
pub const MAX_CHUNK: u32 = 1 << 20;
const MAGIC: &[u8; 8] = b"PVMANIF1";
const HEADER: usize = 8 + 4 + 8;

/// The hash of every `chunk` bytes of an image of `len` bytes (the last chunk may be short).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    chunk: u32,
    len: u64,
    hashes: Vec<[u8; 32]>,
}

/// How much a delta saves over moving the whole image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Saving {
    /// Bytes in the chunks that differ.
    pub changed_bytes: u64,
    /// Bytes of the whole image.
    pub full_bytes: u64,
}

fn check_chunk(chunk: u32) -> Result<(), DeltaError> {
    if (MIN_CHUNK..=MAX_CHUNK).contains(&chunk) && chunk.is_power_of_two() {
        Ok(())
    } else {
        Err(DeltaError::Malformed("chunk size"))
    }
}

impl Manifest {
    /// The manifest of `data` in chunks of `chunk` bytes (a power of two, 4 KiB to 1 MiB).
    pub fn of(data: &[u8], chunk: u32) -> Result<Manifest, DeltaError> {
        Manifest::of_reader(data, chunk).map_err(|_| DeltaError::Malformed("chunk size"))
    }

    /// The manifest of everything `r` yields (a file, a guest memory image).
    pub fn of_reader(mut r: impl Read, chunk: u32) -> std::io::Result<Manifest> {
        check_chunk(chunk).map_err(std::io::Error::other)?;
        let mut buf = vec![0u8; chunk as usize];
        let (mut len, mut hashes) = (0u64, Vec::new());
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match r.read(&mut buf[filled..])? {
                    0 => break,
                    n => filled += n,
                }
            }
            if filled == 0 {
                break;
            }
            hashes.push(Sha256::digest(&buf[..filled]).into());
            len += filled as u64;
            if filled < buf.len() {
                break;
            }
        }
        Ok(Manifest { chunk, len, hashes })
    }

    /// Bytes per chunk.
    pub fn chunk(&self) -> u32 {
        self.chunk
    }

    /// Bytes of the image.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The indices of the chunks that differ from `kept` (the same image, as the device kept it).
    pub fn changed(&self, kept: &Manifest) -> Result<Vec<u64>, DeltaError> {
        if self.chunk != kept.chunk {
            return Err(DeltaError::Mismatch("chunk sizes differ"));
        }
        if self.len != kept.len {
            return Err(DeltaError::Mismatch("lengths differ"));
        }
        Ok((0u64..)
            .zip(self.hashes.iter().zip(&kept.hashes))
            .filter(|(_, (now, then))| now != then)
            .map(|(i, _)| i)
            .collect())
    }

    /// The bytes in the chunks `changed` lists against the whole image.
    pub fn saving(&self, changed: &[u64]) -> Saving {
        let chunk = u64::from(self.chunk);
        let changed_bytes = changed
            .iter()
            .map(|&i| chunk.min(self.len.saturating_sub(i * chunk)))
            .sum();
        Saving {
            changed_bytes,
            full_bytes: self.len,
        }
    }

    /// The manifest as bytes: magic, chunk size, length (little-endian), then the hashes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER + 32 * self.hashes.len());
        v.extend_from_slice(MAGIC);
        v.extend_from_slice(&self.chunk.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        for h in &self.hashes {
            v.extend_from_slice(h);
        }
        v
    }

    /// Parses [`Manifest::to_bytes`]'s form; anything else is refused.
    pub fn from_bytes(b: &[u8]) -> Result<Manifest, DeltaError> {
        let (head, rest) = b
            .split_at_checked(HEADER)
            .ok_or(DeltaError::Malformed("too short"))?;
        if &head[..8] != MAGIC {
            return Err(DeltaError::Malformed("magic"));
        }
        let chunk = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(head[12..20].try_into().expect("8 bytes"));
        check_chunk(chunk)?;
        let want = len.div_ceil(u64::from(chunk));
        if rest.len() % 32 != 0 || rest.len() as u64 / 32 != want {
            return Err(DeltaError::Malformed("hash count does not fit the length"));
        }
        let hashes = rest
            .chunks_exact(32)
            .map(|h| h.try_into().expect("32 bytes"))
            .collect();
        Ok(Manifest { chunk, len, hashes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const C: u32 = 4096;

    fn image(len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from(i * 7 % 251).unwrap())
            .collect()
    }

    #[test]
    fn only_the_chunks_written_since_are_changed() {
        let kept = image(10 * 4096 + 100);
        let mut now = kept.clone();
        now[5] ^= 1; // chunk 0
        now[3 * 4096 + 17] = 0; // chunk 3
        now[10 * 4096 + 99] ^= 0xff; // the short last chunk
        let (m_kept, m_now) = (
            Manifest::of(&kept, C).unwrap(),
            Manifest::of(&now, C).unwrap(),
        );
        let changed = m_now.changed(&m_kept).unwrap();
        assert_eq!(changed, vec![0, 3, 10]);
        let s = m_now.saving(&changed);
        assert_eq!(s.changed_bytes, 2 * 4096 + 100);
        assert_eq!(s.full_bytes, kept.len() as u64);
        assert_eq!(m_kept.changed(&m_kept).unwrap(), Vec::<u64>::new());
    }

    #[test]
    fn a_reader_and_a_slice_give_the_same_manifest() {
        let data = image(3 * 4096 + 1);
        let m = Manifest::of(&data, C).unwrap();
        // A reader that returns a few bytes at a time.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(1000);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        assert_eq!(Manifest::of_reader(Trickle(&data), C).unwrap(), m);
        assert_eq!(m.len(), data.len() as u64);
        assert!(Manifest::of(&[], C).unwrap().is_empty());
    }

    #[test]
    fn manifests_of_different_images_are_refused() {
        let a = Manifest::of(&image(8192), C).unwrap();
        let longer = Manifest::of(&image(8193), C).unwrap();
        let coarser = Manifest::of(&image(8192), 8192).unwrap();
        assert_eq!(
            longer.changed(&a),
            Err(DeltaError::Mismatch("lengths differ"))
        );
        assert_eq!(
            coarser.changed(&a),
            Err(DeltaError::Mismatch("chunk sizes differ"))
        );
        assert!(Manifest::of(&image(10), 4095).is_err());
        assert!(Manifest::of(&image(10), 2048).is_err());
    }

    #[test]
    fn the_byte_form_round_trips_and_damaged_forms_are_refused() {
        let m = Manifest::of(&image(5 * 4096 + 3), C).unwrap();
        let b = m.to_bytes();
        assert_eq!(Manifest::from_bytes(&b).unwrap(), m);
        assert!(Manifest::from_bytes(&b[..b.len() - 1]).is_err());
        assert!(Manifest::from_bytes(&b[..10]).is_err());
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert_eq!(
            Manifest::from_bytes(&bad),
            Err(DeltaError::Malformed("magic"))
        );
        // A length that claims more chunks than there are hashes.
        let mut bad = b.clone();
        bad[12..20].copy_from_slice(&(u64::MAX).to_le_bytes());
        assert!(Manifest::from_bytes(&bad).is_err());
        let mut bad = b;
        bad[8..12].copy_from_slice(&3u32.to_le_bytes());
        assert_eq!(
            Manifest::from_bytes(&bad),
            Err(DeltaError::Malformed("chunk size"))
        );
    }
}
