//! Strict parsing of split-virtqueue descriptor chains.
//!
//! `virtio_queue::DescriptorChain` stops silently on a bad descriptor, so a device cannot tell a
//! truncated chain from a complete one. [`parse_chain`] walks the chain itself and rejects
//! anything malformed: out-of-range indices, loops (more descriptors than the table holds),
//! buffers outside guest memory, a device-readable descriptor after a device-writable one, bad or
//! nested indirect tables, and chains whose total length overflows.
//!
//! A parsed [`Chain`] is two byte streams (driver-to-device and device-to-driver) that devices
//! read and write by offset, independent of how the driver split them into descriptors.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::GuestMem;

/// `VIRTQ_DESC_F_NEXT`: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// `VIRTQ_DESC_F_WRITE`: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// `VIRTQ_DESC_F_INDIRECT`: the buffer is a table of descriptors.
pub const DESC_F_INDIRECT: u16 = 4;

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Why a descriptor chain was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head or a `next` index is outside the descriptor table.
    #[error("descriptor index {0} out of range")]
    IndexOutOfRange(u16),
    /// More descriptors than the table holds: the chain loops.
    #[error("descriptor chain is longer than its table (loop)")]
    TooLong,
    /// A descriptor could not be read from guest memory.
    #[error("descriptor table entry at {0:#x} is not in guest memory")]
    Unreadable(u64),
    /// A buffer is not entirely inside guest memory.
    #[error("buffer {addr:#x}+{len:#x} is not in guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// `VIRTQ_DESC_F_INDIRECT` was used without the feature being negotiated.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// An indirect table is empty, misaligned in length, nested, chained or outside memory.
    #[error("malformed indirect descriptor table")]
    BadIndirect,
    /// The total length of the chain does not fit in 32 bits.
    #[error("descriptor chain total length overflows")]
    LengthOverflow,
    /// An access past the end of the chain's readable or writable bytes.
    #[error("access beyond the end of the descriptor chain")]
    OutOfBounds,
    /// Guest memory rejected an access that validation had accepted.
    #[error("guest memory access failed")]
    Memory,
}

/// One validated buffer: `len` bytes at `addr`, entirely inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never zero).
    pub len: u32,
}

/// A validated descriptor chain, seen as a readable and a writable byte stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// Index of the head descriptor (what goes in the used ring).
    pub head: u16,
    readable: Vec<Segment>,
    writable: Vec<Segment>,
    readable_len: usize,
    writable_len: usize,
}

/// Walks and validates the chain starting at descriptor `head` of the table at `desc_table`
/// holding `queue_size` entries. `indirect` says whether VIRTIO_RING_F_INDIRECT_DESC was
/// negotiated.
pub fn parse_chain(
    mem: &GuestMem,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    indirect: bool,
) -> Result<Chain, ChainError> {
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut table = desc_table;
    let mut table_len = queue_size;
    let mut budget = u32::from(queue_size);
    let mut index = head;
    let mut in_indirect = false;
    let mut total: u32 = 0;

    loop {
        if index >= table_len {
            return Err(ChainError::IndexOutOfRange(index));
        }
        if budget == 0 {
            return Err(ChainError::TooLong);
        }
        budget -= 1;
        let entry = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable(table.raw_value()))?;
        let desc: Descriptor = mem
            .read_obj(entry)
            .map_err(|_| ChainError::Unreadable(entry.raw_value()))?;
        let flags = desc.flags();

        if flags & DESC_F_INDIRECT != 0 {
            if !indirect {
                return Err(ChainError::IndirectNotNegotiated);
            }
            if in_indirect || flags & DESC_F_NEXT != 0 {
                return Err(ChainError::BadIndirect);
            }
            let len = desc.len();
            let entries = u64::from(len) / DESC_SIZE;
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(u16::MAX) {
                return Err(ChainError::BadIndirect);
            }
            if !in_guest_memory(mem, desc.addr(), len) {
                return Err(ChainError::BadIndirect);
            }
            table = desc.addr();
            // `entries` <= u16::MAX was checked above.
            table_len = u16::try_from(entries).map_err(|_| ChainError::BadIndirect)?;
            budget = u32::from(table_len);
            index = 0;
            in_indirect = true;
            continue;
        }

        let len = desc.len();
        if len > 0 {
            if !in_guest_memory(mem, desc.addr(), len) {
                return Err(ChainError::OutOfMemory {
                    addr: desc.addr().raw_value(),
                    len,
                });
            }
            total = total.checked_add(len).ok_or(ChainError::LengthOverflow)?;
            let seg = Segment {
                addr: desc.addr(),
                len,
            };
            let len = len as usize;
            if flags & DESC_F_WRITE != 0 {
                chain.writable.push(seg);
                chain.writable_len += len;
            } else {
                if !chain.writable.is_empty() {
                    return Err(ChainError::ReadableAfterWritable);
                }
                chain.readable.push(seg);
                chain.readable_len += len;
            }
        } else if flags & DESC_F_WRITE == 0 && !chain.writable.is_empty() {
            return Err(ChainError::ReadableAfterWritable);
        }

        if flags & DESC_F_NEXT == 0 {
            return Ok(chain);
        }
        index = desc.next();
    }
}

/// Whether `[addr, addr + len)` lies entirely in guest memory (with overflow checks).
fn in_guest_memory(mem: &GuestMem, addr: GuestAddress, len: u32) -> bool {
    addr.checked_add(u64::from(len)).is_some()
        && GuestMemoryBackend::check_range(mem, addr, len as usize)
}

impl Chain {
    /// Total bytes the device may read.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Total bytes the device may write.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    /// The device-readable buffers, in chain order (each validated to lie in guest memory).
    pub fn readable_segments(&self) -> &[Segment] {
        &self.readable
    }

    /// The device-writable buffers, in chain order (each validated to lie in guest memory).
    pub fn writable_segments(&self) -> &[Segment] {
        &self.writable
    }

    /// Copies `buf.len()` bytes of the readable stream starting at `offset` into `buf`.
    pub fn read_at(&self, mem: &GuestMem, offset: usize, buf: &mut [u8]) -> Result<(), ChainError> {
        let end = offset
            .checked_add(buf.len())
            .ok_or(ChainError::OutOfBounds)?;
        if end > self.readable_len {
            return Err(ChainError::OutOfBounds);
        }
        let mut done = 0;
        for_each_range(&self.readable, offset, buf.len(), |addr, len| {
            let part = buf
                .get_mut(done..done + len)
                .ok_or(ChainError::OutOfBounds)?;
            mem.read_slice(part, addr).map_err(|_| ChainError::Memory)?;
            done += len;
            Ok(())
        })
    }

    /// Copies `data` into the writable stream starting at `offset`.
    pub fn write_at(&self, mem: &GuestMem, offset: usize, data: &[u8]) -> Result<(), ChainError> {
        let end = offset
            .checked_add(data.len())
            .ok_or(ChainError::OutOfBounds)?;
        if end > self.writable_len {
            return Err(ChainError::OutOfBounds);
        }
        let mut done = 0;
        for_each_range(&self.writable, offset, data.len(), |addr, len| {
            let part = data.get(done..done + len).ok_or(ChainError::OutOfBounds)?;
            mem.write_slice(part, addr)
                .map_err(|_| ChainError::Memory)?;
            done += len;
            Ok(())
        })
    }
}

/// Calls `f(addr, len)` for each piece of `segs` covering stream bytes `[offset, offset+count)`.
fn for_each_range(
    segs: &[Segment],
    mut offset: usize,
    mut count: usize,
    mut f: impl FnMut(GuestAddress, usize) -> Result<(), ChainError>,
) -> Result<(), ChainError> {
    for seg in segs {
        if count == 0 {
            break;
        }
        let seg_len = seg.len as usize;
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let len = (seg_len - offset).min(count);
        // Cannot overflow: the segment was checked to lie in guest memory.
        let addr = seg
            .addr
            .checked_add(offset as u64)
            .ok_or(ChainError::OutOfBounds)?;
        f(addr, len)?;
        count -= len;
        offset = 0;
    }
    if count == 0 {
        Ok(())
    } else {
        Err(ChainError::OutOfBounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::worker::testing::{test_mem, write_desc};

    const TABLE: GuestAddress = GuestAddress(0x1000);

    #[test]
    fn gathers_and_scatters_across_descriptors() {
        let mem = test_mem();
        write_desc(&mem, TABLE, 0, 0x4000, 3, DESC_F_NEXT, 1);
        write_desc(&mem, TABLE, 1, 0x5000, 5, DESC_F_NEXT, 2);
        write_desc(&mem, TABLE, 2, 0x6000, 4, DESC_F_WRITE | DESC_F_NEXT, 3);
        write_desc(&mem, TABLE, 3, 0x7000, 4, DESC_F_WRITE, 0);
        mem.write_slice(b"abc", GuestAddress(0x4000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x5000)).unwrap();
        let chain = parse_chain(&mem, TABLE, 8, 0, false).unwrap();
        assert_eq!(chain.readable_len(), 8);
        assert_eq!(chain.writable_len(), 8);
        let mut buf = [0u8; 4];
        chain.read_at(&mem, 2, &mut buf).unwrap();
        assert_eq!(&buf, b"cdef");
        assert_eq!(
            chain.read_at(&mem, 6, &mut buf),
            Err(ChainError::OutOfBounds)
        );
        chain.write_at(&mem, 2, b"WXYZ").unwrap();
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0x6000)).unwrap();
        assert_eq!(&out[2..], b"WX");
        mem.read_slice(&mut out, GuestAddress(0x7000)).unwrap();
        assert_eq!(&out[..2], b"YZ");
    }

    #[test]
    fn rejects_malformed_chains() {
        let mem = test_mem();
        // Loop 0 -> 1 -> 0.
        write_desc(&mem, TABLE, 0, 0x4000, 8, DESC_F_NEXT, 1);
        write_desc(&mem, TABLE, 1, 0x4000, 8, DESC_F_NEXT, 0);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::TooLong)
        );
        // Next index past the table.
        write_desc(&mem, TABLE, 1, 0x4000, 8, DESC_F_NEXT, 9);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::IndexOutOfRange(9))
        );
        // Head past the table.
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 4, false),
            Err(ChainError::IndexOutOfRange(4))
        );
        // Buffer crossing the end of memory, and an address that overflows.
        write_desc(&mem, TABLE, 0, 0xF_FFF0, 0x20, 0, 0);
        assert!(matches!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::OutOfMemory { .. })
        ));
        write_desc(&mem, TABLE, 0, u64::MAX - 4, 0x20, 0, 0);
        assert!(matches!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::OutOfMemory { .. })
        ));
        // Readable after writable.
        write_desc(&mem, TABLE, 0, 0x4000, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
        write_desc(&mem, TABLE, 1, 0x5000, 8, 0, 0);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::ReadableAfterWritable)
        );
        // Descriptor table itself outside memory.
        assert!(matches!(
            parse_chain(&mem, GuestAddress(0x10_0000), 4, 0, false),
            Err(ChainError::Unreadable(_))
        ));
    }

    #[test]
    fn indirect_tables() {
        let mem = test_mem();
        let itable = GuestAddress(0x3000);
        write_desc(&mem, itable, 0, 0x4000, 16, DESC_F_NEXT, 1);
        write_desc(&mem, itable, 1, 0x5000, 1, DESC_F_WRITE, 0);
        write_desc(&mem, TABLE, 0, 0x3000, 32, DESC_F_INDIRECT, 0);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, false),
            Err(ChainError::IndirectNotNegotiated)
        );
        let chain = parse_chain(&mem, TABLE, 4, 0, true).unwrap();
        assert_eq!((chain.readable_len(), chain.writable_len()), (16, 1));
        // Length not a multiple of 16, empty, with NEXT, nested, outside memory.
        for (addr, len, flags) in [
            (0x3000, 24, DESC_F_INDIRECT),
            (0x3000, 0, DESC_F_INDIRECT),
            (0x3000, 32, DESC_F_INDIRECT | DESC_F_NEXT),
            (0xF_FFF0, 32, DESC_F_INDIRECT),
        ] {
            write_desc(&mem, TABLE, 0, addr, len, flags, 1);
            assert_eq!(
                parse_chain(&mem, TABLE, 4, 0, true),
                Err(ChainError::BadIndirect),
                "{addr:#x} {len} {flags}"
            );
        }
        write_desc(&mem, TABLE, 0, 0x3000, 32, DESC_F_INDIRECT, 0);
        write_desc(&mem, itable, 1, 0x3000, 32, DESC_F_INDIRECT, 0);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, true),
            Err(ChainError::BadIndirect)
        );
        // A loop inside the indirect table.
        write_desc(&mem, itable, 1, 0x5000, 1, DESC_F_NEXT, 0);
        assert_eq!(
            parse_chain(&mem, TABLE, 4, 0, true),
            Err(ChainError::TooLong)
        );
    }
}
