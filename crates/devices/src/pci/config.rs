//! A type 0 (endpoint) PCI config space: 256 bytes with a per-byte write mask, memory BARs with
//! sizing, and a capability list builder.

use super::{PciBar, PciError};

/// Size of a conventional PCI config space.
pub const CONFIG_SPACE_SIZE: usize = 256;
/// Number of dword registers in the config space.
pub const NUM_REGS: usize = CONFIG_SPACE_SIZE / 4;
/// Command register bit: memory space decoding enabled.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Dword index of the first BAR.
pub const BAR0_REG: usize = 4;
/// Number of BAR registers in a type 0 header.
pub const NUM_BARS: usize = 6;

const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_PTR: usize = 0x34;
const FIRST_CAP: usize = 0x40;
/// Writable command bits: I/O, memory, bus master, parity, SERR#, INTx disable.
const COMMAND_WRITABLE: u16 = 0x0547;

/// The kind of a memory BAR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR (one register).
    Mem32,
    /// A 64-bit memory BAR (a low/high register pair).
    Mem64,
    /// A 64-bit prefetchable memory BAR: memory without side effects on reads (shared
    /// memory). The root places these in its 64-bit window when it has one.
    Mem64Prefetchable,
}

impl BarKind {
    /// Number of BAR registers the BAR uses.
    fn regs(self) -> usize {
        match self {
            BarKind::Mem32 => 1,
            BarKind::Mem64 | BarKind::Mem64Prefetchable => 2,
        }
    }

    /// The BAR register's low flag bits (memory, type, prefetchable).
    fn flags(self) -> u32 {
        match self {
            BarKind::Mem32 => 0,
            BarKind::Mem64 => 0b0100,
            BarKind::Mem64Prefetchable => 0b1100,
        }
    }
}

/// Identity of a function, fixed at creation.
#[derive(Debug, Clone, Copy, Default)]
pub struct PciConfigParams {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision: u8,
    /// Class code, subclass and programming interface as `0xCCSSPP`.
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// A 256-byte type 0 config space.
pub struct PciConfig {
    bytes: [u8; CONFIG_SPACE_SIZE],
    wmask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<Bar>; NUM_BARS],
    /// Offset of the last capability added (to chain the next one), if any.
    last_cap: Option<usize>,
    /// Where the next capability goes.
    next_cap: usize,
}

impl PciConfig {
    /// A config space with the given identity, no BARs and no capabilities.
    pub fn new(p: PciConfigParams) -> Self {
        let mut c = PciConfig {
            bytes: [0; CONFIG_SPACE_SIZE],
            wmask: [0; CONFIG_SPACE_SIZE],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: FIRST_CAP,
        };
        c.put(0x00, &p.vendor_id.to_le_bytes());
        c.put(0x02, &p.device_id.to_le_bytes());
        c.put(0x08, &[p.revision]);
        c.put(0x09, &(p.class_code & 0xff_ffff).to_le_bytes()[..3]);
        c.put(0x2c, &p.subsystem_vendor_id.to_le_bytes());
        c.put(0x2e, &p.subsystem_id.to_le_bytes());
        c.set_write_mask(COMMAND, &COMMAND_WRITABLE.to_le_bytes());
        // Cache line size, latency timer, interrupt line.
        c.set_write_mask(0x0c, &[0xff, 0xff]);
        c.set_write_mask(0x3c, &[0xff]);
        c
    }

    /// Reads config dword `reg`; registers past the end read as zero.
    pub fn read(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        super::read_slice(&self.bytes, reg.saturating_mul(4) as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// A guest write of `data` at byte `offset` of dword `reg`: only writable bits change.
    pub fn write(&mut self, reg: usize, offset: u64, data: &[u8]) {
        let Ok(offset) = usize::try_from(offset) else {
            return;
        };
        let Some(base) = reg.checked_mul(4).and_then(|r| r.checked_add(offset)) else {
            return;
        };
        if offset >= 4 || offset + data.len() > 4 {
            return;
        }
        for (i, v) in data.iter().enumerate() {
            let at = base + i;
            if let (Some(b), Some(m)) = (self.bytes.get(at), self.wmask.get(at)) {
                let new = (b & !m) | (v & m);
                self.bytes[at] = new;
            }
        }
    }

    /// Reads raw bytes at `offset` (for the device model; out of range reads as zero).
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        super::read_slice(&self.bytes, offset as u64, data);
    }

    /// Sets raw bytes at `offset` regardless of the write mask (for the device model).
    /// Bytes past the end are dropped.
    pub fn put(&mut self, offset: usize, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            if let Some(b) = offset.checked_add(i).and_then(|o| self.bytes.get_mut(o)) {
                *b = *v;
            }
        }
    }

    /// The raw config space bytes (for a snapshot).
    pub fn raw_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        self.bytes
    }

    /// Replaces the config space bytes with ones from a snapshot of a function built the same
    /// way: the identity, BAR flags and capability layout must be what this function has, and
    /// only guest-writable bits may differ. Returns false (and changes nothing) otherwise.
    pub fn restore_raw_bytes(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() != CONFIG_SPACE_SIZE {
            return false;
        }
        let consistent = self
            .bytes
            .iter()
            .zip(&self.wmask)
            .zip(bytes)
            .all(|((cur, m), new)| cur & !m == new & !m);
        if consistent {
            self.bytes.copy_from_slice(bytes);
        }
        consistent
    }

    /// Makes the bits set in `mask` guest-writable at `offset`.
    pub fn set_write_mask(&mut self, offset: usize, mask: &[u8]) {
        for (i, v) in mask.iter().enumerate() {
            if let Some(b) = offset.checked_add(i).and_then(|o| self.wmask.get_mut(o)) {
                *b = *v;
            }
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        u16::from_le_bytes([self.bytes[COMMAND], self.bytes[COMMAND + 1]])
    }

    /// Whether memory space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command() & COMMAND_MEMORY != 0
    }

    /// Declares BAR `index` as a memory BAR of `size` bytes (a power of two, at least 16; at
    /// most 2 GiB for a 32-bit BAR).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), PciError> {
        let bad = PciError::BadBar { index, size };
        let regs = kind.regs();
        if index + regs > NUM_BARS || !size.is_power_of_two() || size < 16 {
            return Err(bad);
        }
        if kind == BarKind::Mem32 && size > 1 << 31 {
            return Err(bad);
        }
        // Register `i` is in use by BAR `i` itself or as the high half of a 64-bit BAR `i - 1`.
        let taken = |i: usize| {
            self.bars[i].is_some()
                || (i > 0 && matches!(self.bars[i - 1], Some(b) if b.kind.regs() == 2))
        };
        if (index..index + regs).any(taken) {
            return Err(bad);
        }
        self.bars[index] = Some(Bar { size, kind });
        let lo_off = (BAR0_REG + index) * 4;
        self.put(lo_off, &kind.flags().to_le_bytes());
        let (lo_mask, hi_mask) = split_u64(!(size - 1));
        self.set_write_mask(lo_off, &(lo_mask & !0xf).to_le_bytes());
        if kind.regs() == 2 {
            self.put(lo_off + 4, &[0; 4]);
            self.set_write_mask(lo_off + 4, &hi_mask.to_le_bytes());
        }
        Ok(())
    }

    /// The address BAR `index` currently holds, if the BAR exists.
    pub fn bar_addr(&self, index: usize) -> Option<u64> {
        let bar = self.bars.get(index).copied().flatten()?;
        let lo = u64::from(self.read(BAR0_REG + index) & !0xf);
        let hi = match bar.kind.regs() {
            2 => u64::from(self.read(BAR0_REG + index + 1)),
            _ => 0,
        };
        Some((hi << 32) | lo)
    }

    /// Programs BAR `index` to `addr` (aligned down to the BAR size); ignored if it doesn't exist.
    pub fn set_bar_addr(&mut self, index: usize, addr: u64) {
        let Some(bar) = self.bars.get(index).copied().flatten() else {
            return;
        };
        let addr = addr & !(bar.size - 1);
        let off = (BAR0_REG + index) * 4;
        let flags = self.read(BAR0_REG + index) & 0xf;
        let (lo, hi) = split_u64(addr);
        self.put(off, &((lo & !0xf) | flags).to_le_bytes());
        if bar.kind.regs() == 2 {
            self.put(off + 4, &hi.to_le_bytes());
        }
    }

    /// All declared BARs with their current addresses.
    pub fn bars(&self) -> Vec<PciBar> {
        (0..NUM_BARS)
            .filter_map(|index| {
                let bar = self.bars[index]?;
                Some(PciBar {
                    index,
                    addr: self.bar_addr(index)?,
                    size: bar.size,
                    prefetchable: bar.kind == BarKind::Mem64Prefetchable,
                })
            })
            .collect()
    }

    /// Appends a capability with ID `id` whose bytes after the ID/next pair are `body`;
    /// returns its offset. The body is read-only until [`set_write_mask`](Self::set_write_mask).
    pub fn add_capability(&mut self, id: u8, body: &[u8]) -> Result<usize, PciError> {
        let len = body.len() + 2;
        let at = self.next_cap;
        let at_reg = u8::try_from(at).map_err(|_| PciError::CapabilitySpace { len })?;
        if at + len > CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpace { len });
        }
        self.put(at, &[id, 0]);
        self.put(at + 2, body);
        match self.last_cap {
            Some(prev) => self.put(prev + 1, &[at_reg]),
            None => {
                self.put(CAP_PTR, &[at_reg]);
                let status = u16::from_le_bytes([self.bytes[STATUS], self.bytes[STATUS + 1]]);
                self.put(STATUS, &(status | STATUS_CAP_LIST).to_le_bytes());
            }
        }
        self.last_cap = Some(at);
        self.next_cap = (at + len + 3) & !3;
        Ok(at)
    }
}

/// The low and high 32-bit halves of `v`.
pub(crate) fn split_u64(v: u64) -> (u32, u32) {
    let [a, b, c, d, e, f, g, h] = v.to_le_bytes();
    (
        u32::from_le_bytes([a, b, c, d]),
        u32::from_le_bytes([e, f, g, h]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PciConfig {
        PciConfig::new(PciConfigParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class_code: 0x018000,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        })
    }

    #[test]
    fn identity_is_read_only() {
        let mut c = cfg();
        assert_eq!(c.read(0), 0x1042_1af4);
        c.write(0, 0, &[0xff; 4]);
        assert_eq!(c.read(0), 0x1042_1af4);
        assert_eq!(c.read(2), 0x0180_0001);
        assert_eq!(c.read(11), 0x0040_1af4);
        assert_eq!(c.read(1000), 0);
    }

    #[test]
    fn command_register_masks_bits() {
        let mut c = cfg();
        c.write(1, 0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.read(1), u32::from(COMMAND_WRITABLE));
        assert!(c.memory_enabled());
        c.write(1, 0, &[0]);
        assert!(!c.memory_enabled());
        // A write straddling the dword is ignored.
        c.write(1, 3, &[0xff, 0xff]);
        assert_eq!(c.read(1), 0x0500);
    }

    #[test]
    fn bar64_sizing_and_relocation() {
        let mut c = cfg();
        c.add_bar(0, 0x4000, BarKind::Mem64).unwrap();
        c.set_bar_addr(0, 0xc000_4000);
        assert_eq!(c.read(4), 0xc000_4004);
        assert_eq!(c.read(5), 0);
        c.write(4, 0, &0xffff_ffffu32.to_le_bytes());
        c.write(5, 0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(c.read(4), 0xffff_c004);
        assert_eq!(c.read(5), 0xffff_ffff);
        c.write(4, 0, &0xd000_0000u32.to_le_bytes());
        c.write(5, 0, &1u32.to_le_bytes());
        assert_eq!(c.bar_addr(0), Some(0x1_d000_0000));
        assert_eq!(
            c.bars(),
            vec![PciBar {
                index: 0,
                addr: 0x1_d000_0000,
                size: 0x4000,
                prefetchable: false,
            }]
        );
        // Unimplemented BARs read zero even after an all-ones write.
        c.write(6, 0, &[0xff; 4]);
        assert_eq!(c.read(6), 0);
    }

    #[test]
    fn bar_validation() {
        let mut c = cfg();
        assert!(c.add_bar(5, 0x1000, BarKind::Mem64).is_err());
        assert!(c.add_bar(0, 0x1001, BarKind::Mem32).is_err());
        assert!(c.add_bar(0, 8, BarKind::Mem32).is_err());
        c.add_bar(0, 0x1000, BarKind::Mem64).unwrap();
        assert!(c.add_bar(1, 0x1000, BarKind::Mem32).is_err());
        assert!(c.add_bar(0, 0x1000, BarKind::Mem32).is_err());
        c.add_bar(2, 0x1000, BarKind::Mem32).unwrap();
        c.set_bar_addr(2, 0xc000_1234);
        assert_eq!(c.read(6), 0xc000_1000);
    }

    #[test]
    fn capability_chain() {
        let mut c = cfg();
        let a = c.add_capability(0x11, &[1; 10]).unwrap();
        let b = c.add_capability(0x09, &[2; 3]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(b, 0x4c);
        assert_eq!(c.read(1) >> 16 & 0x10, 0x10);
        assert_eq!(c.read(0x34 / 4) & 0xff, 0x40);
        assert_eq!(c.read(0x40 / 4) & 0xffff, 0x4c11);
        assert_eq!(c.read(0x4c / 4) & 0xffff, 0x0009);
        assert!(c.add_capability(0x09, &[0; 200]).is_err());
    }
}
