//! Just enough ACPI to count processors: RSDP -> RSDT/XSDT -> MADT.

use crate::port::mmio;

/// Maximum CPUs the probe brings up.
pub const MAX_CPUS: usize = 64;

fn checksum_ok(addr: u64, len: u64) -> bool {
    let mut s: u8 = 0;
    for i in 0..len {
        s = s.wrapping_add(mmio::read::<u8>(addr + i));
    }
    s == 0
}

fn sig_at(addr: u64, sig: &[u8]) -> bool {
    sig.iter()
        .enumerate()
        .all(|(i, &b)| mmio::read::<u8>(addr + i as u64) == b)
}

/// Finds the RSDP: `hint` from start_info if valid, else a scan of 0xE0000..0x100000.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && hint < 0x1_0000_0000 && sig_at(hint, b"RSD PTR ") && checksum_ok(hint, 20) {
        return Some(hint);
    }
    (0xE_0000u64..0x10_0000)
        .step_by(16)
        .find(|&a| sig_at(a, b"RSD PTR ") && checksum_ok(a, 20))
}

fn table_ok(addr: u64) -> Option<u32> {
    if addr == 0 || addr >= 0xC000_0000 {
        return None;
    }
    let len = mmio::read::<u32>(addr + 4);
    (36..=0x10_0000).contains(&len).then_some(len)
}

/// Finds an ACPI table by signature through the XSDT (revision >= 2) or RSDT.
pub fn find_table(rsdp: u64, sig: &[u8; 4]) -> Option<u64> {
    let rev = mmio::read::<u8>(rsdp + 15);
    let xsdt = if rev >= 2 {
        mmio::read::<u64>(rsdp + 24)
    } else {
        0
    };
    let (root, entry) = if xsdt != 0 {
        (xsdt, 8)
    } else {
        (mmio::read::<u32>(rsdp + 16) as u64, 4)
    };
    let len = table_ok(root)? as u64;
    let n = (len - 36) / entry;
    (0..n).find_map(|i| {
        let p = root + 36 + i * entry;
        let t = if entry == 8 {
            mmio::read::<u64>(p)
        } else {
            mmio::read::<u32>(p) as u64
        };
        (table_ok(t).is_some() && sig_at(t, sig)).then_some(t)
    })
}

/// APIC ids of the enabled processors listed in the MADT.
pub struct Cpus {
    /// APIC ids; the first `count` are valid.
    pub ids: [u32; MAX_CPUS],
    /// Number of enabled processors found.
    pub count: usize,
}

/// Reads the enabled processors (LAPIC and x2APIC entries) from the MADT.
pub fn madt_cpus(rsdp_hint: u64) -> Option<Cpus> {
    let rsdp = find_rsdp(rsdp_hint)?;
    let madt = find_table(rsdp, b"APIC")?;
    let len = table_ok(madt)? as u64;
    let mut cpus = Cpus {
        ids: [0; MAX_CPUS],
        count: 0,
    };
    let mut off = 44;
    while off + 2 <= len {
        let typ = mmio::read::<u8>(madt + off);
        let elen = mmio::read::<u8>(madt + off + 1) as u64;
        if elen < 2 || off + elen > len {
            break;
        }
        let (id, flags) = match typ {
            0 if elen >= 8 => (
                mmio::read::<u8>(madt + off + 3) as u32,
                mmio::read::<u32>(madt + off + 4),
            ),
            9 if elen >= 16 => (
                mmio::read::<u32>(madt + off + 4),
                mmio::read::<u32>(madt + off + 8),
            ),
            _ => (0, 0),
        };
        if flags & 1 != 0 && cpus.count < MAX_CPUS && !cpus.ids[..cpus.count].contains(&id) {
            cpus.ids[cpus.count] = id;
            cpus.count += 1;
        }
        off += elen;
    }
    Some(cpus)
}
