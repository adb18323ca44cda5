//! Shared-memory regions (virtio 1.2, 2.10): memory the device and the driver both access
//! directly, like virtio-gpu's host-visible blobs.
//!
//! A device that has them returns a [`SharedMemory`] from
//! [`VirtioDevice::shared_memory`](super::VirtioDevice::shared_memory): one host mapping and
//! the regions carved out of it. The virtio-pci transport exposes the mapping as a 64-bit
//! prefetchable BAR ([`SHM_BAR`](super::pci::SHM_BAR)) with one `VIRTIO_PCI_CAP_SHARED_MEMORY_CFG`
//! capability per region, and asks the hypervisor to map the host memory at the BAR's guest
//! address while the BAR is decoded.

use vm_memory::{MmapRegion, VolatileMemory};

/// Smallest shared-memory BAR (one page).
const MIN_SIZE: u64 = 4096;

/// One region: `len` bytes at `offset` in the device's shared memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShmRegion {
    /// The region's shmid (device-specific meaning).
    pub id: u8,
    /// Offset in the shared memory (and in the BAR).
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Why shared memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// The size is not a power of two of at least a page.
    #[error("shared memory size {0:#x} is not a power of two of at least 4 KiB")]
    Size(u64),
    /// A region lies outside the memory or overlaps another one.
    #[error("shared memory region {0} is outside the memory or overlaps another region")]
    Region(u8),
    /// The host mapping could not be created.
    #[error("cannot map {size:#x} bytes of shared memory: {reason}")]
    Map { size: u64, reason: String },
}

/// A device's shared memory: a host mapping the guest sees through a BAR.
pub struct SharedMemory {
    mapping: MmapRegion<()>,
    regions: Vec<ShmRegion>,
}

impl SharedMemory {
    /// Maps `size` bytes (a power of two, at least 4 KiB; it becomes the BAR size) of anonymous
    /// host memory holding `regions`, which must lie inside it and not overlap.
    pub fn new(size: u64, regions: Vec<ShmRegion>) -> Result<Self, ShmError> {
        if !size.is_power_of_two() || size < MIN_SIZE {
            return Err(ShmError::Size(size));
        }
        let mut sorted = regions.clone();
        sorted.sort_by_key(|r| r.offset);
        let mut end_of_previous = 0;
        for r in &sorted {
            let end = r
                .offset
                .checked_add(r.len)
                .filter(|&e| e <= size && r.len > 0);
            match end {
                Some(end) if r.offset >= end_of_previous => end_of_previous = end,
                _ => return Err(ShmError::Region(r.id)),
            }
        }
        let len = usize::try_from(size).map_err(|_| ShmError::Size(size))?;
        let mapping = MmapRegion::new(len).map_err(|e| ShmError::Map {
            size,
            reason: e.to_string(),
        })?;
        Ok(SharedMemory { mapping, regions })
    }

    /// Size of the mapping (the BAR size).
    pub fn size(&self) -> u64 {
        self.mapping.size() as u64
    }

    /// The regions.
    pub fn regions(&self) -> &[ShmRegion] {
        &self.regions
    }

    /// Host address of the mapping (what the hypervisor maps at the BAR's guest address).
    pub fn host_addr(&self) -> u64 {
        self.mapping.as_ptr() as u64
    }

    /// Copies `data.len()` bytes at `offset` into `data`; false (and `data` untouched) if the
    /// range is outside the mapping.
    pub fn read(&self, offset: u64, data: &mut [u8]) -> bool {
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match self.mapping.get_slice(offset, data.len()) {
            Ok(slice) => {
                slice.copy_to(data);
                true
            }
            Err(_) => false,
        }
    }

    /// Copies `data` to `offset`; false (and nothing written) if the range is outside the
    /// mapping.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Ok(offset) = usize::try_from(offset) else {
            return false;
        };
        match self.mapping.get_slice(offset, data.len()) {
            Ok(slice) => {
                slice.copy_from(data);
                true
            }
            Err(_) => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(id: u8, offset: u64, len: u64) -> ShmRegion {
        ShmRegion { id, offset, len }
    }

    #[test]
    fn regions_must_fit_and_not_overlap() {
        assert!(matches!(
            SharedMemory::new(0x3000, vec![]),
            Err(ShmError::Size(0x3000))
        ));
        assert!(matches!(
            SharedMemory::new(0x1000, vec![region(1, 0x800, 0x1000)]),
            Err(ShmError::Region(1))
        ));
        assert!(matches!(
            SharedMemory::new(
                0x4000,
                vec![region(1, 0, 0x2000), region(2, 0x1000, 0x1000)]
            ),
            Err(ShmError::Region(2))
        ));
        assert!(matches!(
            SharedMemory::new(0x4000, vec![region(3, u64::MAX, 2)]),
            Err(ShmError::Region(3))
        ));
        let shm = SharedMemory::new(
            0x4000,
            vec![region(1, 0, 0x2000), region(2, 0x2000, 0x2000)],
        )
        .unwrap();
        assert_eq!(shm.size(), 0x4000);
        assert_eq!(shm.regions().len(), 2);
    }

    #[test]
    fn reads_and_writes_stay_inside_the_mapping() {
        let shm = SharedMemory::new(0x1000, vec![region(0, 0, 0x1000)]).unwrap();
        assert!(shm.write(0xffc, &[1, 2, 3, 4]));
        let mut b = [0u8; 4];
        assert!(shm.read(0xffc, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
        assert!(!shm.write(0xffd, &[0; 4]));
        assert!(!shm.read(u64::MAX, &mut b));
        assert_eq!(b, [1, 2, 3, 4]);
    }
}
