//! The `pci` test on arm64: bus 0 enumerated through the ECAM window the device tree names
//! (the x86 test's lines), and every assigned memory BAR checked to lie inside one of the
//! host bridge's `ranges` windows.

use crate::fdt::PciHost;

/// Bytes of configuration space per function (ECAM: bus << 20 | dev << 15 | func << 12).
const FUNCTION_SPACE: u64 = 4096;

/// One function's configuration space.
#[derive(Clone, Copy)]
pub struct Function {
    base: u64,
    /// Bus, device and function numbers.
    pub bdf: (u8, u8, u8),
}

impl Function {
    /// Reads the config dword at `off` (aligned down to 4).
    pub fn read32(&self, off: u16) -> u32 {
        let addr = self.base + u64::from(off & 0xffc);
        // The probe is 64-bit: a u64 address is a usize.
        #[allow(clippy::cast_possible_truncation)]
        let addr = addr as usize;
        // SAFETY: `base` is a function's 4 KiB inside the ECAM window of the device tree
        // (checked in `at`), `off` is below 4 KiB and aligned; device memory, MMU off.
        unsafe { core::ptr::read_volatile(addr as *const u32) }
    }

    /// Writes the config dword at `off` (aligned down to 4).
    pub fn write32(&self, off: u16, v: u32) {
        let addr = self.base + u64::from(off & 0xffc);
        #[allow(clippy::cast_possible_truncation)]
        let addr = addr as usize;
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
    }

    /// The PCI requester id (bus << 8 | device << 3 | function), the ITS's device id.
    pub fn requester_id(&self) -> u32 {
        let (bus, dev, func) = self.bdf;
        (u32::from(bus) << 8) | (u32::from(dev) << 3) | u32::from(func)
    }

    /// Reads the config byte at `off`.
    pub fn read8(&self, off: u16) -> u8 {
        (self.read32(off) >> ((off & 3) * 8)).to_le_bytes()[0]
    }

    /// Enables memory decoding and bus mastering (the status half is written as zeros, which
    /// leaves its write-one-to-clear bits alone).
    pub fn enable(&self) {
        let cmd = self.read32(4) & 0xffff;
        let addr = self.base + 4;
        #[allow(clippy::cast_possible_truncation)]
        let addr = addr as usize;
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile(addr as *mut u32, cmd | 0x6) }
    }

    /// Capabilities: (id, offset) pairs, at most 48 (a looping list cannot hang the probe).
    pub fn caps(&self) -> impl Iterator<Item = (u8, u16)> + '_ {
        let has = self.read32(4) & (1 << 20) != 0;
        let mut ptr = if has {
            u16::from(self.read8(0x34) & 0xfc)
        } else {
            0
        };
        let mut budget = 48;
        core::iter::from_fn(move || {
            if ptr < 0x40 || budget == 0 {
                return None;
            }
            budget -= 1;
            let here = ptr;
            let id = self.read8(here);
            ptr = u16::from(self.read8(here + 1) & 0xfc);
            Some((id, here))
        })
    }

    /// The memory address BAR `n` holds (64-bit BARs joined); `None` for an I/O BAR, an
    /// unassigned one, or the upper half of a 64-bit BAR.
    pub fn bar(&self, n: u16) -> Option<(u64, bool)> {
        let lo = self.read32(0x10 + 4 * n);
        if lo & 1 != 0 {
            return None;
        }
        let wide = (lo >> 1) & 3 == 2;
        let mut addr = u64::from(lo & !0xf);
        if wide && n < 5 {
            addr |= u64::from(self.read32(0x14 + 4 * n)) << 32;
        }
        (addr != 0).then_some((addr, wide))
    }
}

/// The function `dev.func` of bus 0, if the ECAM window holds it.
fn at(host: &PciHost, dev: u8, func: u8) -> Option<Function> {
    let off = (u64::from(dev) << 15) | (u64::from(func) << 12);
    (off + FUNCTION_SPACE <= host.ecam.1).then(|| Function {
        base: host.ecam.0 + off,
        bdf: (0, dev, func),
    })
}

/// Calls `f` for each function present on bus 0 (multi-function aware).
pub fn for_each_function(host: &PciHost, mut f: impl FnMut(Function, u32)) {
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let Some(fun) = at(host, dev, func) else {
                return;
            };
            let id = fun.read32(0);
            if id & 0xffff == 0xffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            f(fun, id);
            let header_type = (fun.read32(0xc) >> 16) & 0xff;
            if func == 0 && header_type & 0x80 == 0 {
                break;
            }
        }
    }
}

/// The `pci` test: `pci <bdf> vendor=<hex> device=<hex> class=<hex>` for each function,
/// `pci <bdf> bar<n>=<hex>` for each assigned memory BAR, then `pci ok count=<n>`; false
/// after `pci fail ...` when there is no function or a BAR lies outside the windows.
pub fn selftest(host: &PciHost) -> bool {
    let mut count = 0u32;
    let mut outside = 0u32;
    for_each_function(host, |fun, id| {
        let (bus, dev, func) = fun.bdf;
        let class = fun.read32(8) >> 8;
        crate::uart::line(format_args!(
            "pci {bus:02x}:{dev:02x}.{func:x} vendor={:04x} device={:04x} class={class:06x}",
            id & 0xffff,
            id >> 16
        ));
        count += 1;
        let header_type = (fun.read32(0xc) >> 16) & 0x7f;
        if header_type != 0 {
            return;
        }
        let mut n = 0u16;
        while n < 6 {
            let bar = fun.bar(n);
            if let Some((addr, wide)) = bar {
                let inside = host.in_windows(addr, 1);
                crate::uart::line(format_args!(
                    "pci {bus:02x}:{dev:02x}.{func:x} bar{n}={addr:x} in-ranges={}",
                    if inside { "yes" } else { "no" }
                ));
                if !inside {
                    outside += 1;
                }
                if wide {
                    n += 1;
                }
            }
            n += 1;
        }
    });
    if count == 0 {
        crate::uart::line(format_args!("pci fail no-functions"));
        false
    } else if outside != 0 {
        crate::uart::line(format_args!("pci fail bars-outside-ranges={outside}"));
        false
    } else {
        crate::uart::line(format_args!("pci ok count={count}"));
        true
    }
}
