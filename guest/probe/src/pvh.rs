//! PVH `hvm_start_info` parsing and the kernel command line.

use crate::port::mmio;
use crate::sync::Global;

const START_INFO_MAGIC: u32 = 0x336E_C578;
const CMDLINE_MAX: usize = 4096;

/// What the probe keeps from the boot protocol.
pub struct BootInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// RSDP physical address from start_info (0 when absent).
    pub rsdp: u64,
    /// Whether start_info had the right magic.
    pub valid: bool,
    /// End of the RAM that contains the kernel (from 1 MiB, following adjacent e820
    /// RAM entries); 0 when start_info has no memory map.
    pub low_ram: u64,
}

static BOOT: Global<BootInfo> = Global::new(BootInfo {
    cmdline: [0; CMDLINE_MAX],
    cmdline_len: 0,
    rsdp: 0,
    valid: false,
    low_ram: 0,
});

/// Copies what we need out of `hvm_start_info` at `paddr` (before anything can overwrite it).
pub fn init(paddr: u64) {
    let b = BOOT.get_mut();
    if paddr == 0 || mmio::read::<u32>(paddr) != START_INFO_MAGIC {
        return;
    }
    b.valid = true;
    let cmdline = mmio::read::<u64>(paddr + 24);
    b.rsdp = mmio::read::<u64>(paddr + 32);
    let version = mmio::read::<u32>(paddr + 4);
    if version >= 1 {
        let map = mmio::read::<u64>(paddr + 40);
        let n = mmio::read::<u32>(paddr + 48).min(128) as u64;
        // Grow the RAM range from the kernel (1 MiB) through adjacent RAM entries.
        let mut top = 0x10_0000u64;
        for _ in 0..n {
            for i in 0..n {
                let e = map + 24 * i;
                let (addr, size) = (mmio::read::<u64>(e), mmio::read::<u64>(e + 8));
                if map != 0 && mmio::read::<u32>(e + 16) == 1 && addr <= top {
                    top = top.max(addr.saturating_add(size));
                }
            }
        }
        b.low_ram = if top > 0x10_0000 { top } else { 0 };
    }
    if cmdline != 0 {
        let mut n = 0;
        while n < CMDLINE_MAX - 1 {
            let c = mmio::read::<u8>(cmdline + n as u64);
            if c == 0 {
                break;
            }
            // Keep the line printable and on one line.
            b.cmdline[n] = if (0x20..0x7F).contains(&c) && c != b'"' {
                c
            } else {
                b' '
            };
            n += 1;
        }
        b.cmdline_len = n;
    }
}

/// The boot information captured by [`init`].
pub fn info() -> &'static BootInfo {
    BOOT.get()
}

impl BootInfo {
    /// The command line (printable ASCII).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The value of `key=value` on the command line (last occurrence wins).
    pub fn arg(&self, key: &str) -> Option<&str> {
        let mut found = None;
        for tok in self.cmdline().split(' ') {
            if let Some((k, v)) = tok.split_once('=') {
                if k == key {
                    found = Some(v);
                }
            }
        }
        found
    }

    /// A numeric argument (decimal or 0x hex), or `default`.
    pub fn arg_u64(&self, key: &str, default: u64) -> u64 {
        self.arg(key).and_then(parse_u64).unwrap_or(default)
    }
}

/// Parses decimal or `0x` hexadecimal.
pub fn parse_u64(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x") {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}
