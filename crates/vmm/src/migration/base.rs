//! A destination's base: a copy of the guest it already holds (a kept snapshot and the disks
//! as they were), described by the SHA-256 of every guest page and every disk chunk, so that
//! the source's first round sends only what differs (a return from the cloud host).
//!
//! ```text
//! base:  disks u32 | pages u64 | pages x [32] | for each disk: chunks u64 | chunks x [32]
//! ```
//!
//! An empty `Base` frame says the destination has none. Integers are little-endian; the
//! counts must be exactly those of the layout and disks the source announced.

use sha2::{Digest, Sha256};
use vm_memory::{Bytes, GuestAddress};

use devices::GuestMem;

use super::refused;
use crate::memory::DIRTY_PAGE_SIZE;
use crate::snapshot::memory::MemRegion;
use crate::Error;

/// Bytes of a page, as a buffer length.
const PAGE_LEN: usize = 4096;
const _: () = assert!(PAGE_LEN as u64 == DIRTY_PAGE_SIZE);

/// A page's or chunk's digest.
pub(crate) type Digest32 = [u8; 32];

/// What the destination holds: a digest per guest page and per disk chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Base {
    /// One per page of the regions, in region order.
    pub(crate) memory: Vec<Digest32>,
    /// Per disk, one per chunk.
    pub(crate) disks: Vec<Vec<Digest32>>,
}

pub(crate) fn digest(bytes: &[u8]) -> Digest32 {
    Sha256::digest(bytes).into()
}

/// The pages of `regions`, counted as the digests go (a short last page counts as one).
pub(crate) fn page_count(regions: &[MemRegion]) -> u64 {
    regions
        .iter()
        .map(|r| r.size.div_ceil(DIRTY_PAGE_SIZE))
        .sum()
}

/// Calls `f(addr, bytes)` for every page of `regions` in `mem`, in order.
pub(crate) fn for_each_page(
    mem: &GuestMem,
    regions: &[MemRegion],
    mut f: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut page = vec![0u8; PAGE_LEN];
    for r in regions {
        let mut off = 0;
        while off < r.size {
            let len = (r.size - off).min(DIRTY_PAGE_SIZE);
            let buf = &mut page[..usize::try_from(len).map_err(refused)?];
            let addr = r.guest_addr + off;
            mem.read_slice(buf, GuestAddress(addr))
                .map_err(|e| refused(format!("reading guest memory at {addr:#x}: {e}")))?;
            f(addr, buf)?;
            off += len;
        }
    }
    Ok(())
}

/// The digests of every page of `mem`.
pub(crate) fn of_memory(mem: &GuestMem, regions: &[MemRegion]) -> Result<Vec<Digest32>, Error> {
    let mut out = Vec::new();
    for_each_page(mem, regions, |_, page| {
        out.push(digest(page));
        Ok(())
    })?;
    Ok(out)
}

fn bad() -> Error {
    refused("a base that does not fit this VM's memory and disks")
}

/// Reads a base payload from the front.
struct Reader<'a> {
    rest: &'a [u8],
}

impl Reader<'_> {
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let (head, tail) = self.rest.split_at_checked(N).ok_or_else(bad)?;
        self.rest = tail;
        head.try_into().map_err(|_| bad())
    }

    /// A count, which must be `expected`, and that many digests.
    fn list(&mut self, expected: u64) -> Result<Vec<Digest32>, Error> {
        let fits = usize::try_from(expected)
            .ok()
            .and_then(|n| n.checked_mul(32))
            .is_some_and(|n| n <= self.rest.len().saturating_sub(8));
        if u64::from_le_bytes(self.array()?) != expected || !fits {
            return Err(bad());
        }
        (0..expected).map(|_| self.array()).collect()
    }
}

impl Base {
    /// The frame's payload.
    pub(crate) fn to_bytes(&self) -> Result<Vec<u8>, Error> {
        let n = self.memory.len() + self.disks.iter().map(Vec::len).sum::<usize>();
        let mut b = Vec::with_capacity(12 + 8 * self.disks.len() + 32 * n);
        let disks = u32::try_from(self.disks.len()).map_err(|_| refused("too many disks"))?;
        b.extend_from_slice(&disks.to_le_bytes());
        b.extend_from_slice(&(self.memory.len() as u64).to_le_bytes());
        self.memory.iter().for_each(|d| b.extend_from_slice(d));
        for disk in &self.disks {
            b.extend_from_slice(&(disk.len() as u64).to_le_bytes());
            disk.iter().for_each(|d| b.extend_from_slice(d));
        }
        Ok(b)
    }

    /// Parses a `Base` payload for a VM of `pages` pages and disks of `chunks` chunks each;
    /// None for an empty one (no base). Any other shape is refused.
    pub(crate) fn from_bytes(b: &[u8], pages: u64, chunks: &[u64]) -> Result<Option<Base>, Error> {
        if b.is_empty() {
            return Ok(None);
        }
        let mut r = Reader { rest: b };
        let disks = u32::from_le_bytes(r.array()?);
        if usize::try_from(disks).ok() != Some(chunks.len()) {
            return Err(bad());
        }
        let memory = r.list(pages)?;
        let disks = chunks
            .iter()
            .map(|&c| r.list(c))
            .collect::<Result<Vec<_>, _>>()?;
        if !r.rest.is_empty() {
            return Err(bad());
        }
        Ok(Some(Base { memory, disks }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_round_trips_and_any_other_shape_is_refused() {
        let base = Base {
            memory: vec![[1; 32], [2; 32], [3; 32]],
            disks: vec![vec![[4; 32]], vec![]],
        };
        let b = base.to_bytes().unwrap();
        assert_eq!(Base::from_bytes(&b, 3, &[1, 0]).unwrap(), Some(base));
        assert_eq!(Base::from_bytes(&[], 3, &[1, 0]).unwrap(), None);
        assert!(Base::from_bytes(&b, 4, &[1, 0]).is_err());
        assert!(Base::from_bytes(&b, 3, &[1]).is_err());
        assert!(Base::from_bytes(&b, 3, &[2, 0]).is_err());
        assert!(Base::from_bytes(&b[..b.len() - 1], 3, &[1, 0]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(Base::from_bytes(&long, 3, &[1, 0]).is_err());
        // A count that would not fit in memory is refused by the shape, not allocated.
        let mut huge = b.clone();
        huge[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Base::from_bytes(&huge, 3, &[1, 0]).is_err());
    }
}
