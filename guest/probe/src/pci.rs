//! PCI configuration space through ports 0xCF8/0xCFC, bus 0 enumeration, BARs and
//! capability lists.

use crate::port::{inl, outl};
use crate::probe;

/// A PCI function address on bus 0..=255.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub dev: u8,
    /// Function number (0..8).
    pub func: u8,
}

impl core::fmt::Display for Bdf {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

fn address(b: Bdf, off: u8) -> u32 {
    0x8000_0000
        | (b.bus as u32) << 16
        | ((b.dev & 31) as u32) << 11
        | ((b.func & 7) as u32) << 8
        | (off & 0xFC) as u32
}

/// Reads the config dword containing `off`.
pub fn read32(b: Bdf, off: u8) -> u32 {
    outl(0xCF8, address(b, off));
    inl(0xCFC)
}

/// Writes a config dword.
pub fn write32(b: Bdf, off: u8, v: u32) {
    outl(0xCF8, address(b, off));
    outl(0xCFC, v);
}

/// Reads a config word (`off` 2-aligned).
pub fn read16(b: Bdf, off: u8) -> u16 {
    crate::bits::lo16(read32(b, off) >> ((off & 2) * 8))
}

/// Reads a config byte.
pub fn read8(b: Bdf, off: u8) -> u8 {
    crate::bits::lo8(read32(b, off) >> ((off & 3) * 8))
}

/// Writes a config word (`off` 2-aligned) with a read-modify-write of its dword.
pub fn write16(b: Bdf, off: u8, v: u16) {
    let shift = (off & 2) * 8;
    let old = read32(b, off) & !(0xFFFF << shift);
    write32(b, off, old | (v as u32) << shift);
}

/// One discovered function.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    /// Its address.
    pub bdf: Bdf,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code, subclass, prog-if.
    pub class: u32,
}

/// Functions found on bus 0.
pub struct Functions {
    /// The first `count` entries are valid.
    pub list: [Option<Function>; 64],
    /// How many were found.
    pub count: usize,
}

/// Enumerates bus 0 (multi-function aware).
pub fn scan() -> Functions {
    let mut out = Functions {
        list: [None; 64],
        count: 0,
    };
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let bdf = Bdf { bus: 0, dev, func };
            let id = read32(bdf, 0);
            if id & 0xFFFF == 0xFFFF {
                if func == 0 {
                    break;
                }
                continue;
            }
            if out.count < out.list.len() {
                out.list[out.count] = Some(Function {
                    bdf,
                    vendor: crate::bits::lo16(id),
                    device: (id >> 16) as u16,
                    class: read32(bdf, 8) >> 8,
                });
                out.count += 1;
            }
            if func == 0 && read8(bdf, 0x0E) & 0x80 == 0 {
                break;
            }
        }
    }
    out
}

impl Functions {
    /// Iterates over the found functions.
    pub fn iter(&self) -> impl Iterator<Item = &Function> {
        self.list[..self.count].iter().flatten()
    }

    /// The `nth` function with this vendor/device id.
    pub fn find(&self, vendor: u16, device: u16, nth: usize) -> Option<Function> {
        self.iter()
            .filter(|f| f.vendor == vendor && f.device == device)
            .nth(nth)
            .copied()
    }
}

/// The memory address of BAR `n` (handles 64-bit BARs); `None` for I/O or unassigned BARs.
pub fn bar_address(b: Bdf, n: u8) -> Option<u64> {
    if n > 5 {
        return None;
    }
    let off = 0x10 + 4 * n;
    let lo = read32(b, off);
    if lo & 1 != 0 {
        return None;
    }
    let mut addr = (lo & !0xF) as u64;
    if (lo >> 1) & 3 == 2 && n < 5 {
        addr |= (read32(b, off + 4) as u64) << 32;
    }
    (addr != 0).then_some(addr)
}

/// Enables memory decoding and bus mastering.
pub fn enable(b: Bdf) {
    let cmd = read16(b, 4);
    write16(b, 4, cmd | 0x6);
}

/// Iterates the capability list: yields (capability id, offset).
pub fn caps(b: Bdf) -> impl Iterator<Item = (u8, u8)> {
    let has = read16(b, 6) & 0x10 != 0;
    let mut ptr = if has { read8(b, 0x34) & 0xFC } else { 0 };
    let mut budget = 48; // a malicious/buggy loop cannot hang us
    core::iter::from_fn(move || {
        if ptr < 0x40 || budget == 0 {
            return None;
        }
        budget -= 1;
        let here = ptr;
        let id = read8(b, here);
        ptr = read8(b, here + 1) & 0xFC;
        Some((id, here))
    })
}

/// The `pci` selftest part.
pub fn selftest() {
    let fns = scan();
    for f in fns.iter() {
        probe!(
            "pci {} vendor={:04x} device={:04x} class={:06x}",
            f.bdf,
            f.vendor,
            f.device,
            f.class
        );
    }
    if fns.count == 0 {
        crate::fail("pci", format_args!("no-functions"));
    } else {
        probe!("pci ok count={}", fns.count);
    }
}
