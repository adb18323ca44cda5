//! Address-range dispatch of guest port I/O and MMIO accesses.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest accesses to a range of addresses.
///
/// `offset` is relative to the start of the range the device was inserted at. Devices must accept
/// any offset and length within their range (the guest picks them) without panicking.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
    /// A range of zero length, or one that wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
}

/// A shared device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A set of non-overlapping address ranges, each owned by one device.
#[derive(Default, Clone)]
pub struct Bus {
    ranges: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&b, &(l, _))) = self.ranges.range(..end).next_back() {
            if b + l > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, (len, device));
        Ok(())
    }

    /// The device covering `addr` with the offset of `addr` in its range.
    fn find(&self, addr: u64, len: usize) -> Option<(&SharedDevice, u64)> {
        let (&base, (size, dev)) = self.ranges.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(len as u64)? <= *size).then_some((dev, offset))
    }

    /// Whether a device covers `len` bytes at `addr`.
    pub fn covers(&self, addr: u64, len: usize) -> bool {
        self.find(addr, len).is_some()
    }

    /// Dispatches a read; returns false (and leaves `data` untouched) when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; returns false when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((dev, offset)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if another thread panicked while holding it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(crate::narrow::low_u8(offset));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn dispatches_by_range_and_rejects_overlap() {
        let mut bus = Bus::new();
        let dev: SharedDevice = Arc::new(Mutex::new(Echo(vec![])));
        bus.insert(0x10, 8, dev.clone()).unwrap();
        assert!(bus.insert(0x14, 8, dev.clone()).is_err());
        assert!(bus.insert(0x8, 9, dev.clone()).is_err());
        bus.insert(0x18, 8, dev.clone()).unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x13, &mut b));
        assert_eq!(b, [3, 3]);
        assert!(!bus.read(0x0f, &mut b));
        // An access straddling the end of a range is not dispatched.
        assert!(!bus.read(0x1f, &mut b));
        assert!(bus.write(0x10, &[7]));
        assert!(bus.insert(u64::MAX, 2, dev).is_err());
    }
}
