//! The aarch64 guest physical memory map, in the style of QEMU's `virt` machine: devices in
//! the first GiB, RAM from 1 GiB up in one region.
//!
//! The device tree (`fdt.rs`) describes exactly these addresses to the guest.

use vm_memory::GuestAddress;

/// GICv3 distributor.
pub const GIC_DIST_START: u64 = 0x0800_0000;
/// GICv3 distributor size.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// GICv3 ITS (MSI translation for PCI devices): its 64 KiB control frame and 64 KiB
/// translation frame.
pub const GIC_ITS_START: u64 = 0x0808_0000;
/// GICv3 ITS size.
pub const GIC_ITS_SIZE: u64 = 0x2_0000;
/// GICv3 redistributors (one 128 KiB frame per vCPU: room for 254 vCPUs below the PCI
/// window).
pub const GIC_REDIST_START: u64 = 0x0A00_0000;
/// Size of one vCPU's redistributor frame.
pub const GIC_REDIST_SIZE_PER_VCPU: u64 = 0x2_0000;
/// The console UART (16550-compatible, on the MMIO bus).
pub const SERIAL_START: u64 = 0x0900_0000;
/// The console UART's register window.
pub const SERIAL_SIZE: u64 = 0x1000;
/// The console UART's interrupt (an SPI number, which is also its GSI).
pub const SERIAL_IRQ: u32 = 1;
/// The 16550's input clock, as the device tree states it (the standard 1.8432 MHz).
pub const SERIAL_CLOCK_HZ: u32 = 1_843_200;
/// The PL031 real-time clock.
pub const RTC_START: u64 = 0x0901_0000;
/// The PL031's register window.
pub const RTC_SIZE: u64 = 0x1000;
/// The PL031's interrupt (described to the guest; never raised: no alarms).
pub const RTC_IRQ: u32 = 2;
/// The APB bus clock PrimeCell devices name (`apb_pclk`), as the device tree states it.
pub const APB_CLOCK_HZ: u32 = 24_000_000;
/// Interrupt lines the vGIC has: 32 private (SGIs and PPIs) plus 96 SPIs.
pub const GIC_NR_IRQS: u32 = 128;
/// Most space the flattened device tree may take (the arm64 boot protocol's limit), at the
/// top of RAM.
pub const FDT_MAX_SIZE: u64 = 0x20_0000;
/// First address of the 32-bit PCI MMIO window (BARs).
pub const PCI_MMIO_START: u64 = 0x1000_0000;
/// Size of the 32-bit PCI MMIO window.
pub const PCI_MMIO_SIZE: u64 = 0x2F00_0000;
/// PCI ECAM (bus 0 only: 32 devices x 8 functions x 4 KiB).
pub const PCI_ECAM_START: u64 = 0x3F00_0000;
/// PCI ECAM size.
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// First address of the 64-bit PCI MMIO window (prefetchable BARs, shared-memory regions):
/// 512 GiB, above the RAM of the largest guest ([`MAX_MEMORY`]).
pub const PCI_MMIO64_START: u64 = 0x80_0000_0000;
/// Size of the 64-bit PCI MMIO window.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;
/// Where guest RAM starts.
pub const RAM_START: u64 = 0x4000_0000;
/// Largest guest memory size: RAM from [`RAM_START`] up to the 64-bit PCI window (511 GiB).
pub const MAX_MEMORY: u64 = PCI_MMIO64_START - RAM_START;
/// First GSI handed out for MSI routes (after the 32 SPIs kept for platform devices).
pub const MSI_GSI_BASE: u32 = 32;
/// Smallest guest RAM the platform supports.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Largest kernel command line, including the terminating NUL (arm64's COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;

/// Guest RAM for `size` bytes: one region from [`RAM_START`].
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    // A guest larger than the host's address space cannot be mapped anyway; clamp rather
    // than wrap (the VMM checks the size against host RAM before it maps anything).
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    vec![(GuestAddress(RAM_START), len)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_windows_sit_below_ram_without_overlap() {
        let mut windows = [
            (GIC_DIST_START, GIC_DIST_SIZE),
            (GIC_ITS_START, GIC_ITS_SIZE),
            (GIC_REDIST_START, 254 * GIC_REDIST_SIZE_PER_VCPU),
            (SERIAL_START, SERIAL_SIZE),
            (RTC_START, RTC_SIZE),
            (PCI_MMIO_START, PCI_MMIO_SIZE),
            (PCI_ECAM_START, PCI_ECAM_SIZE),
            (RAM_START, PCI_MMIO64_START - RAM_START),
            (PCI_MMIO64_START, PCI_MMIO64_SIZE),
        ];
        windows.sort();
        for w in windows.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        assert_eq!(
            ram_regions(64 << 20),
            vec![(GuestAddress(RAM_START), 64 << 20)]
        );
    }
}
