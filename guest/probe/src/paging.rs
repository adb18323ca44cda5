//! Run-time additions to the identity map for MMIO above 4 GiB (64-bit BARs).

use crate::port::{cr3, flush_tlb, mmio};

const PRESENT_RW: u64 = 0x3;
const HUGE_UC: u64 = 0x83 | 0x18;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Ensures `[addr, addr+len)` is identity mapped (uncached 2 MiB pages above 4 GiB).
pub fn map_identity(addr: u64, len: u64) {
    if addr.saturating_add(len) <= 0x1_0000_0000 {
        return; // the boot stub mapped the first 4 GiB
    }
    let mut page = addr & !0x1F_FFFF;
    let end = addr.saturating_add(len);
    while page < end {
        map_2m(page);
        page += 0x20_0000;
    }
    flush_tlb();
}

fn next_table(entry_addr: u64) -> u64 {
    let e = mmio::read::<u64>(entry_addr);
    if e & 1 != 0 {
        return e & ADDR_MASK;
    }
    let t = crate::mem::page();
    mmio::write::<u64>(entry_addr, t | PRESENT_RW);
    t
}

fn map_2m(page: u64) {
    let pml4 = cr3() & ADDR_MASK;
    let pdpt = next_table(pml4 + 8 * ((page >> 39) & 511));
    let pd = next_table(pdpt + 8 * ((page >> 30) & 511));
    mmio::write::<u64>(pd + 8 * ((page >> 21) & 511), page | HUGE_UC);
}
