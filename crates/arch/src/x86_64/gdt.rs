//! Global descriptor table entries and their KVM segment register form.

use kvm_bindings::kvm_segment;

/// Access/flags word for a 64-bit code segment (G, L, present, DPL 0, execute/read, accessed).
pub const CODE64_FLAGS: u16 = 0xa09b;
/// Access/flags word for a 32-bit code segment (G, D, present, execute/read, accessed).
pub const CODE32_FLAGS: u16 = 0xc09b;
/// Access/flags word for a flat data segment (G, D/B, present, read/write, accessed).
pub const DATA_FLAGS: u16 = 0xc093;
/// Access/flags word for a busy 32/64-bit TSS, byte granular.
pub const TSS_FLAGS: u16 = 0x008b;

/// GDT index of the code segment.
pub const CODE_INDEX: u16 = 1;
/// GDT index of the data segment.
pub const DATA_INDEX: u16 = 2;
/// GDT index of the task state segment.
pub const TSS_INDEX: u16 = 3;
/// Number of GDT entries written by [`boot_gdt`].
pub const GDT_ENTRIES: usize = 4;

/// Encodes one GDT descriptor from its flags/access word, base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    ((base & 0xff00_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
        | ((limit & 0x000f_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
}

fn entry_base(entry: u64) -> u64 {
    ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000)
}

// Both masks keep the value below 2^20, so the cast is lossless.
#[allow(clippy::cast_possible_truncation)]
fn entry_limit(entry: u64) -> u32 {
    ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32
}

/// Decodes GDT descriptor `entry` at index `index` into the segment register KVM expects.
pub fn kvm_segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let granular = bit(55);
    let raw_limit = entry_limit(entry);
    let limit = if granular == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base: entry_base(entry),
        limit,
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: granular,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT: null, flat code (64-bit when `long_mode`, else 32-bit), flat data, TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; GDT_ENTRIES] {
    let code = if long_mode {
        CODE64_FLAGS
    } else {
        CODE32_FLAGS
    };
    [
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA_FLAGS, 0, 0xfffff),
        gdt_entry(TSS_FLAGS, 0, 0x67),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_known_descriptors() {
        // Values as found in the Linux and Firecracker boot GDTs.
        assert_eq!(gdt_entry(CODE64_FLAGS, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(CODE32_FLAGS, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(DATA_FLAGS, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x0089, 0x1234_5678, 0x67), 0x1200_8934_5678_0067);
    }

    #[test]
    fn decodes_code64() {
        let seg = kvm_segment_from_gdt(gdt_entry(CODE64_FLAGS, 0, 0xfffff), CODE_INDEX);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.selector, 0x8);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(
            (seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g),
            (1, 0, 0, 1, 1, 1)
        );
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn decodes_data_and_tss() {
        let data = kvm_segment_from_gdt(gdt_entry(DATA_FLAGS, 0, 0xfffff), DATA_INDEX);
        assert_eq!(
            (data.selector, data.type_, data.db, data.l),
            (0x10, 0x3, 1, 0)
        );
        assert_eq!(data.limit, 0xffff_ffff);
        let tss = kvm_segment_from_gdt(gdt_entry(TSS_FLAGS, 0x1234_5678, 0x67), TSS_INDEX);
        assert_eq!((tss.selector, tss.type_, tss.s, tss.g), (0x18, 0xb, 0, 0));
        assert_eq!((tss.base, tss.limit), (0x1234_5678, 0x67));
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn boot_gdt_modes() {
        let long = boot_gdt(true);
        let prot = boot_gdt(false);
        assert_eq!(long[0], 0);
        assert_eq!(kvm_segment_from_gdt(long[1], 1).l, 1);
        assert_eq!(kvm_segment_from_gdt(prot[1], 1).l, 0);
        assert_eq!(kvm_segment_from_gdt(prot[1], 1).db, 1);
    }
}
