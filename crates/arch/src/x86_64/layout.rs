//! The guest physical memory map and fixed port/IRQ assignments (the platform contract).

use vm_memory::GuestAddress;

/// Start of high memory: kernels load at or above this address.
pub const HIMEM_START: u64 = 0x10_0000;
/// The PVH `hvm_start_info` or the Linux zero page.
pub const START_INFO_ADDR: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
/// PVH memory map table, after the module list.
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// End (exclusive) of the area holding the start info, module list and memory map.
pub const START_INFO_END: u64 = 0x8000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Largest command line, including its terminating NUL.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// Global descriptor table used for the boot vCPU.
pub const GDT_ADDR: u64 = 0x500;
/// Empty interrupt descriptor table used for the boot vCPU.
pub const IDT_ADDR: u64 = 0x520;
/// Identity-mapping page tables for the 64-bit Linux entry: PML4.
pub const PML4_ADDR: u64 = 0x9000;
/// Identity-mapping page tables: the page directory pointer table.
pub const PDPT_ADDR: u64 = 0xA000;
/// Identity-mapping page tables: first of four page directories (4 GiB in 2 MiB pages).
pub const PD_ADDR: u64 = 0xB000;
/// Number of page directories (each maps 1 GiB).
pub const PD_COUNT: u64 = 4;
/// Initial stack pointer for the 64-bit Linux entry (stack page 0xF000-0xFFFF).
pub const BOOT_STACK_POINTER: u64 = 0xFFF0;
/// End of conventional low memory (RAM below the legacy VGA/BIOS hole).
pub const LOW_RAM_END: u64 = 0xA_0000;
/// ACPI tables area; the RSDP sits at its start.
pub const ACPI_START: u64 = 0xE_0000;
/// End (exclusive) of the ACPI tables area.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of the MMIO hole below 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End (exclusive) of the MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// PCI 32-bit memory window (BARs).
pub const PCI_MMIO_START: u64 = 0xC000_0000;
/// Size of the PCI 32-bit memory window.
pub const PCI_MMIO_SIZE: u64 = 0x2000_0000;
/// Largest guest memory size allowed (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// End (exclusive) of guest RAM for the largest guest: the RAM above the MMIO hole ends at
/// 4 GiB + (MAX_MEMORY - 3 GiB).
pub const MAX_RAM_END: u64 = MMIO_HOLE_END + (MAX_MEMORY - MMIO_HOLE_START);
/// Size of the PCI 64-bit memory window (64-bit prefetchable BARs: shared memory).
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// PCI 64-bit memory window: the first `PCI_MMIO64_SIZE`-aligned address above the RAM of
/// the largest guest, so it never overlaps RAM whatever the memory size.
pub const PCI_MMIO64_START: u64 = MAX_RAM_END.next_multiple_of(PCI_MMIO64_SIZE);
/// Guest physical address width the 64-bit window needs at most.
pub const MAX_PHYS_ADDR_BITS: u32 = 46;
/// PCI ECAM (bus 0 only).
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// Size of the ECAM area (1 MiB: one bus).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Size reserved for the IOAPIC in the memory map.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size reserved for the local APIC in the memory map.
pub const LAPIC_SIZE: u64 = 0x1000;
/// COM1 16550 base port.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
/// ACPI PM1a event block (4 bytes: status, enable).
pub const PM1A_EVT_PORT: u16 = 0x600;
/// ACPI PM1a control block (2 bytes).
pub const PM1A_CNT_PORT: u16 = 0x604;
/// ACPI system control interrupt.
pub const SCI_IRQ: u32 = 9;
/// Debug-exit port: a write of `v` ends the VMM with status `v`.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// First GSI used for MSI routes (0-23 are IOAPIC pins).
pub const MSI_GSI_BASE: u32 = 24;
/// Smallest guest memory size accepted.
pub const MIN_MEMORY: u64 = 16 << 20;

// The fixed low-memory areas must not overlap each other (checked at compile time).
const _: () = {
    assert!(PVH_MODLIST_ADDR >= START_INFO_ADDR + 56);
    assert!(PVH_MEMMAP_ADDR >= PVH_MODLIST_ADDR + 32);
    assert!(START_INFO_ADDR + 0x1000 <= START_INFO_END);
    assert!(IDT_ADDR >= GDT_ADDR + 4 * 8);
    assert!(PML4_ADDR >= 0x9000 && PDPT_ADDR > PML4_ADDR && PD_ADDR > PDPT_ADDR);
    assert!(PD_ADDR + PD_COUNT * 0x1000 <= BOOT_STACK_POINTER);
    assert!(BOOT_STACK_POINTER < CMDLINE_ADDR);
    assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= LOW_RAM_END);
    assert!(PCI_MMIO_START + PCI_MMIO_SIZE <= PCI_ECAM_START);
    assert!(PCI_ECAM_START + PCI_ECAM_SIZE <= IOAPIC_START);
    assert!(PCI_MMIO64_START >= MAX_RAM_END);
    assert!(PCI_MMIO64_START.is_multiple_of(PCI_MMIO64_SIZE));
    assert!(PCI_MMIO64_START + PCI_MMIO64_SIZE <= 1 << MAX_PHYS_ADDR_BITS);
};

/// RAM regions for a guest of `size` bytes: [0, min(size, 3G)) and [4G, 4G + rest).
// This module only builds for x86_64 hosts, where usize is 64 bits: the casts are lossless.
#[allow(clippy::cast_possible_truncation)]
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = Vec::with_capacity(2);
    if low > 0 {
        regions.push((GuestAddress(0), low as usize));
    }
    let high = size - low;
    if high > 0 {
        regions.push((GuestAddress(MMIO_HOLE_END), high as usize));
    }
    regions
}

/// End (exclusive) of RAM below the MMIO hole for a guest of `size` bytes.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
// Test inputs are small constants and indices; their casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn mmio64_window_is_above_ram_of_every_allowed_size() {
        for size in [16 * MIB, 256 * MIB, 3 * GIB, 4 * GIB, 64 * GIB, MAX_MEMORY] {
            let end = ram_regions(size)
                .iter()
                .map(|(a, l)| a.0 + *l as u64)
                .max()
                .unwrap();
            assert!(end <= PCI_MMIO64_START, "{size:#x}");
        }
        // 1 TiB + 64 GiB to 1 TiB + 128 GiB: a 41-bit guest physical address width suffices.
        assert_eq!(
            (PCI_MMIO64_START, PCI_MMIO64_START + PCI_MMIO64_SIZE),
            ((1 << 40) + (64 << 30), (1 << 40) + (128 << 30))
        );
    }

    #[test]
    fn regions_256m() {
        assert_eq!(
            ram_regions(256 * MIB),
            vec![(GuestAddress(0), (256 * MIB) as usize)]
        );
    }

    #[test]
    fn regions_3g() {
        assert_eq!(
            ram_regions(3 * GIB),
            vec![(GuestAddress(0), (3 * GIB) as usize)]
        );
    }

    #[test]
    fn regions_4g() {
        assert_eq!(
            ram_regions(4 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), GIB as usize)
            ]
        );
    }

    #[test]
    fn regions_5g() {
        assert_eq!(
            ram_regions(5 * GIB),
            vec![
                (GuestAddress(0), (3 * GIB) as usize),
                (GuestAddress(4 * GIB), (2 * GIB) as usize)
            ]
        );
    }
}
