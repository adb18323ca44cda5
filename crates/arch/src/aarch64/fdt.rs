//! The flattened device tree that tells an arm64 guest what the machine is: RAM, the vCPUs
//! (started through PSCI), the GICv3 with its ITS, the architected timer, the 16550 UART, the
//! PL031 real-time clock (with the APB clock PrimeCell devices need) and the PCI host bridge
//! (ECAM, with MSIs through the ITS).

use vm_fdt::FdtWriter;

use super::layout::{
    APB_CLOCK_HZ, GIC_DIST_SIZE, GIC_DIST_START, GIC_ITS_SIZE, GIC_ITS_START,
    GIC_REDIST_SIZE_PER_VCPU, GIC_REDIST_START, PCI_MMIO64_SIZE, PCI_MMIO64_START, RAM_START,
    RTC_IRQ, RTC_SIZE, RTC_START, SERIAL_CLOCK_HZ, SERIAL_IRQ, SERIAL_SIZE, SERIAL_START,
};
use super::{BootConfig, Error};

const GIC_PHANDLE: u32 = 1;
const ITS_PHANDLE: u32 = 2;
const APB_CLOCK_PHANDLE: u32 = 3;

/// Interrupt specifier cells of the GIC binding: the kind of line...
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// ...and its trigger.
const IRQ_EDGE_RISING: u32 = 1;
const IRQ_LEVEL_HIGH: u32 = 4;

/// The architected timer's PPIs: secure and non-secure physical, virtual, hypervisor.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];

/// Where the initrd was put.
#[derive(Clone, Copy, Debug)]
pub struct InitrdRange {
    /// First byte (guest physical).
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
}

/// The `reg` of vCPU `id` in the device tree: its MPIDR affinity as KVM assigns it (Aff0 is
/// the low 4 bits of the id, Aff1 the next 8).
pub fn mpidr_of(id: u8) -> u32 {
    let id = u32::from(id);
    ((id >> 4) << 8) | (id & 0xf)
}

fn fdt_err(e: vm_fdt::Error) -> Error {
    Error::Fdt(e.to_string())
}

/// The device tree blob for `cfg`, with the initrd at `initrd` if there is one.
pub fn create_fdt(cfg: &BootConfig, initrd: Option<InitrdRange>) -> Result<Vec<u8>, Error> {
    let mut f = FdtWriter::new().map_err(fdt_err)?;
    let root = f.begin_node("").map_err(fdt_err)?;
    f.property_string("compatible", "linux,dummy-virt")
        .map_err(fdt_err)?;
    f.property_u32("#address-cells", 2).map_err(fdt_err)?;
    f.property_u32("#size-cells", 2).map_err(fdt_err)?;
    f.property_u32("interrupt-parent", GIC_PHANDLE)
        .map_err(fdt_err)?;

    chosen(&mut f, cfg, initrd).map_err(fdt_err)?;
    memory(&mut f, cfg.mem_size).map_err(fdt_err)?;
    cpus(&mut f, cfg.nr_vcpus).map_err(fdt_err)?;
    psci(&mut f).map_err(fdt_err)?;
    gic(&mut f, cfg.nr_vcpus).map_err(fdt_err)?;
    timer(&mut f).map_err(fdt_err)?;
    uart(&mut f).map_err(fdt_err)?;
    rtc(&mut f).map_err(fdt_err)?;
    pci(&mut f, cfg).map_err(fdt_err)?;

    f.end_node(root).map_err(fdt_err)?;
    f.finish().map_err(fdt_err)
}

type Written = Result<(), vm_fdt::Error>;

/// A 64-bit value as two device-tree cells, high first.
fn split(v: u64) -> [u32; 2] {
    let b = v.to_be_bytes();
    [
        u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
    ]
}

fn chosen(f: &mut FdtWriter, cfg: &BootConfig, initrd: Option<InitrdRange>) -> Written {
    let node = f.begin_node("chosen")?;
    f.property_string("bootargs", cfg.cmdline)?;
    f.property_string("stdout-path", &format!("/uart@{SERIAL_START:x}"))?;
    if let Some(r) = initrd {
        f.property_u64("linux,initrd-start", r.start)?;
        f.property_u64("linux,initrd-end", r.start + r.size)?;
    }
    f.end_node(node)
}

fn memory(f: &mut FdtWriter, size: u64) -> Written {
    let node = f.begin_node(&format!("memory@{RAM_START:x}"))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &[RAM_START, size])?;
    f.end_node(node)
}

fn cpus(f: &mut FdtWriter, nr_vcpus: u8) -> Written {
    let node = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    for id in 0..nr_vcpus {
        let mpidr = mpidr_of(id);
        let cpu = f.begin_node(&format!("cpu@{mpidr:x}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,arm-v8")?;
        f.property_string("enable-method", "psci")?;
        f.property_u32("reg", mpidr)?;
        f.end_node(cpu)?;
    }
    f.end_node(node)
}

fn psci(f: &mut FdtWriter) -> Written {
    let node = f.begin_node("psci")?;
    f.property_string_list("compatible", vec!["arm,psci-0.2".into(), "arm,psci".into()])?;
    f.property_string("method", "hvc")?;
    f.end_node(node)
}

fn gic(f: &mut FdtWriter, nr_vcpus: u8) -> Written {
    let node = f.begin_node(&format!("intc@{GIC_DIST_START:x}"))?;
    f.property_string("compatible", "arm,gic-v3")?;
    f.property_u32("#interrupt-cells", 3)?;
    f.property_null("interrupt-controller")?;
    f.property_array_u64(
        "reg",
        &[
            GIC_DIST_START,
            GIC_DIST_SIZE,
            GIC_REDIST_START,
            u64::from(nr_vcpus) * GIC_REDIST_SIZE_PER_VCPU,
        ],
    )?;
    f.property_phandle(GIC_PHANDLE)?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_null("ranges")?;
    let its = f.begin_node(&format!("msic@{GIC_ITS_START:x}"))?;
    f.property_string("compatible", "arm,gic-v3-its")?;
    f.property_null("msi-controller")?;
    f.property_u32("#msi-cells", 1)?;
    f.property_array_u64("reg", &[GIC_ITS_START, GIC_ITS_SIZE])?;
    f.property_phandle(ITS_PHANDLE)?;
    f.end_node(its)?;
    f.end_node(node)
}

fn timer(f: &mut FdtWriter) -> Written {
    let node = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    f.property_null("always-on")?;
    let cells: Vec<u32> = TIMER_PPIS
        .iter()
        .flat_map(|&ppi| [GIC_PPI, ppi, IRQ_LEVEL_HIGH])
        .collect();
    f.property_array_u32("interrupts", &cells)?;
    f.end_node(node)
}

fn uart(f: &mut FdtWriter) -> Written {
    let node = f.begin_node(&format!("uart@{SERIAL_START:x}"))?;
    f.property_string("compatible", "ns16550a")?;
    f.property_array_u64("reg", &[SERIAL_START, SERIAL_SIZE])?;
    f.property_u32("clock-frequency", SERIAL_CLOCK_HZ)?;
    // The UART's interrupt reaches KVM through an irqfd, which pulses the line: an edge.
    f.property_array_u32("interrupts", &[GIC_SPI, SERIAL_IRQ, IRQ_EDGE_RISING])?;
    f.end_node(node)
}

/// The PL031 and the fixed APB clock it names (Linux's AMBA bus enables a PrimeCell
/// device's `apb_pclk` before it reads the device's id).
fn rtc(f: &mut FdtWriter) -> Written {
    let clock = f.begin_node("apb-pclk")?;
    f.property_string("compatible", "fixed-clock")?;
    f.property_u32("#clock-cells", 0)?;
    f.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    f.property_string("clock-output-names", "clk24mhz")?;
    f.property_phandle(APB_CLOCK_PHANDLE)?;
    f.end_node(clock)?;
    let node = f.begin_node(&format!("pl031@{RTC_START:x}"))?;
    f.property_string_list(
        "compatible",
        vec!["arm,pl031".into(), "arm,primecell".into()],
    )?;
    f.property_array_u64("reg", &[RTC_START, RTC_SIZE])?;
    f.property_array_u32("interrupts", &[GIC_SPI, RTC_IRQ, IRQ_LEVEL_HIGH])?;
    f.property_u32("clocks", APB_CLOCK_PHANDLE)?;
    f.property_string("clock-names", "apb_pclk")?;
    f.end_node(node)
}

/// PCI address-space codes of the `ranges` property's first cell.
const PCI_SPACE_MMIO32: u32 = 0x0200_0000;
const PCI_SPACE_MMIO64_PREFETCH: u32 = 0x4300_0000;

fn pci(f: &mut FdtWriter, cfg: &BootConfig) -> Written {
    let pci = cfg.pci;
    let node = f.begin_node(&format!("pcie@{:x}", pci.ecam_base))?;
    f.property_string("compatible", "pci-host-ecam-generic")?;
    f.property_string("device_type", "pci")?;
    f.property_u32("#address-cells", 3)?;
    f.property_u32("#size-cells", 2)?;
    f.property_array_u64("reg", &[pci.ecam_base, pci.ecam_size])?;
    // ECAM gives 1 MiB per bus.
    let last_bus = u32::try_from((pci.ecam_size >> 20).saturating_sub(1)).unwrap_or(0);
    f.property_array_u32("bus-range", &[0, last_bus])?;
    f.property_u32("linux,pci-domain", 0)?;
    f.property_null("dma-coherent")?;
    let range = |space: u32, base: u64, size: u64| {
        let [bh, bl] = split(base);
        let [sh, sl] = split(size);
        // PCI address = CPU address (identity mapped windows).
        [space, bh, bl, bh, bl, sh, sl]
    };
    let mut ranges = Vec::new();
    ranges.extend(range(PCI_SPACE_MMIO32, pci.mmio_base, pci.mmio_size));
    ranges.extend(range(
        PCI_SPACE_MMIO64_PREFETCH,
        PCI_MMIO64_START,
        PCI_MMIO64_SIZE,
    ));
    f.property_array_u32("ranges", &ranges)?;
    // Every requester id (bus/device/function) is the ITS device id of the same number.
    f.property_array_u32("msi-map", &[0, ITS_PHANDLE, 0, 0x1_0000])?;
    f.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PciInfo;

    fn cfg(nr_vcpus: u8) -> BootConfig<'static> {
        BootConfig {
            cmdline: "console=ttyS0",
            nr_vcpus,
            mem_size: 256 << 20,
            pci: PciInfo::default(),
        }
    }

    /// Whether `needle` occurs in the blob (node names, strings and big-endian cells do).
    fn contains(blob: &[u8], needle: &[u8]) -> bool {
        blob.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn the_tree_names_every_device_at_its_layout_address() {
        let blob = create_fdt(
            &cfg(3),
            Some(InitrdRange {
                start: 0x5000_0000,
                size: 0x1000,
            }),
        )
        .unwrap();
        assert_eq!(&blob[..4], &0xd00d_feedu32.to_be_bytes(), "FDT magic");
        for name in [
            "memory@40000000",
            "cpu@0",
            "cpu@2",
            "intc@8000000",
            "msic@8080000",
            "uart@9000000",
            "pl031@9010000",
            "arm,primecell",
            "apb_pclk",
            "pcie@3f000000",
            "arm,psci-0.2",
            "arm,armv8-timer",
            "pci-host-ecam-generic",
            "console=ttyS0",
        ] {
            assert!(contains(&blob, name.as_bytes()), "{name} missing");
        }
        assert!(!contains(&blob, b"cpu@3"), "one node per vCPU");
        // The redistributor region is sized for the vCPUs.
        let mut redist = GIC_REDIST_START.to_be_bytes().to_vec();
        redist.extend((3 * GIC_REDIST_SIZE_PER_VCPU).to_be_bytes());
        assert!(contains(&blob, &redist));
        // The initrd's end is start + size.
        assert!(contains(&blob, &0x5000_1000u64.to_be_bytes()));
    }

    #[test]
    fn without_initrd_the_tree_has_no_initrd_properties() {
        let blob = create_fdt(&cfg(1), None).unwrap();
        assert!(!contains(&blob, b"linux,initrd-start"));
        assert!(u64::try_from(blob.len()).unwrap() < crate::layout::FDT_MAX_SIZE);
    }

    #[test]
    fn mpidr_follows_kvm_affinity() {
        assert_eq!(mpidr_of(0), 0);
        assert_eq!(mpidr_of(15), 15);
        assert_eq!(mpidr_of(16), 0x100);
        assert_eq!(mpidr_of(254), 0xf0e);
    }
}
