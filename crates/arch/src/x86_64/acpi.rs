//! ACPI tables: RSDP (at 0xE0000) -> XSDT -> FADT (-> FACS, DSDT), MADT, MCFG.

use acpi_tables::aml;
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{
    ACPI_END, ACPI_START, COM1_IRQ, COM1_PORT, IOAPIC_START, LAPIC_START, PM1A_CNT_PORT,
    PM1A_EVT_PORT, SCI_IRQ,
};
use super::{check_vcpu_count, Error, PciInfo};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"PKTVSR";
/// OEM table id in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"POCKETVS";
const OEM_REVISION: u32 = 1;

/// MADT flag: the platform also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT interrupt source override flags: active high, level triggered.
const MPS_INTI_ACTIVE_HIGH_LEVEL: u16 = 0x1 | (0x3 << 2);
/// MADT interrupt source override flags: conforms to the bus.
const MPS_INTI_CONFORMS: u16 = 0;
/// FADT IAPC_BOOT_ARCH: VGA not present (the display is a linear framebuffer).
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;

/// Adds the bytes of an `Aml` object to a vector.
fn aml_bytes(obj: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    obj.to_aml_bytes(&mut bytes);
    bytes
}

/// Serializes `Device(name) { names... }`.
fn device(name: &str, names: Vec<aml::Name>) -> Vec<u8> {
    let children: Vec<&dyn Aml> = names.iter().map(|n| n as &dyn Aml).collect();
    aml_bytes(&aml::Device::new(name.into(), children))
}

/// Raw, already serialized AML.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Builds the DSDT: `\_S5_`, the PCI host bridge, COM1 and the ECAM motherboard reservation.
pub fn build_dsdt(pci: &PciInfo) -> Vec<u8> {
    let s5 = aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&aml::ZERO, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let bus = aml::AddressSpace::new_bus_number(0u16, 0u16);
    let cfg_ports = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = aml::AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_high = aml::AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mmio_last = pci
        .mmio_base
        .saturating_add(pci.mmio_size.max(1))
        .saturating_sub(1);
    let mem32;
    let mem64;
    let mmio_window: &dyn Aml = match (u32::try_from(pci.mmio_base), u32::try_from(mmio_last)) {
        (Ok(base), Ok(last)) => {
            mem32 = aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                base,
                last,
                None,
            );
            &mem32
        }
        _ => {
            mem64 = aml::AddressSpace::new_memory(
                aml::AddressSpaceCacheable::NotCacheable,
                true,
                pci.mmio_base,
                mmio_last,
                None,
            );
            &mem64
        }
    };
    let pci_crs =
        aml::ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, mmio_window]);
    let pci_hid = aml::EISAName::new("PNP0A08");
    let pci_cid = aml::EISAName::new("PNP0A03");
    let pci0 = device(
        "PCI0",
        vec![
            aml::Name::new("_HID".into(), &pci_hid),
            aml::Name::new("_CID".into(), &pci_cid),
            aml::Name::new("_ADR".into(), &aml::ZERO),
            aml::Name::new("_SEG".into(), &aml::ZERO),
            aml::Name::new("_BBN".into(), &aml::ZERO),
            aml::Name::new("_UID".into(), &aml::ZERO),
            aml::Name::new("_CRS".into(), &pci_crs),
        ],
    );

    let com1_hid = aml::EISAName::new("PNP0501");
    let com1_io = aml::IO::new(COM1_PORT, COM1_PORT, 0, 8);
    let com1_irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1 = device(
        "COM1",
        vec![
            aml::Name::new("_HID".into(), &com1_hid),
            aml::Name::new("_UID".into(), &aml::ZERO),
            aml::Name::new("_CRS".into(), &com1_crs),
        ],
    );

    // Linux only trusts an MCFG area that a motherboard resource device reserves.
    let mbrd_hid = aml::EISAName::new("PNP0C02");
    let mut mbrd_names = vec![
        aml::Name::new("_HID".into(), &mbrd_hid),
        aml::Name::new("_UID".into(), &aml::ZERO),
    ];
    if let (Ok(base), Ok(size)) = (u32::try_from(pci.ecam_base), u32::try_from(pci.ecam_size)) {
        let ecam = aml::Memory32Fixed::new(false, base, size);
        let crs = aml::ResourceTemplate::new(vec![&ecam]);
        mbrd_names.push(aml::Name::new("_CRS".into(), &crs));
    }
    let mbrd = device("MBRD", mbrd_names);

    let (pci0, com1, mbrd) = (RawAml(pci0), RawAml(com1), RawAml(mbrd));
    let sb = aml::Scope::new("\\_SB_".into(), vec![&pci0, &com1, &mbrd]);

    let mut body = aml_bytes(&s5);
    body.extend_from_slice(&aml_bytes(&sb));

    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}

/// Builds the MADT: one enabled local APIC per vCPU, the IOAPIC and the ISA overrides.
pub fn build_madt(nr_vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_START as u32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..nr_vcpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_START as u32, 0)));
    madt.append_slice(&interrupt_source_override(0, 2, MPS_INTI_CONFORMS));
    madt.append_slice(&interrupt_source_override(
        SCI_IRQ as u8,
        SCI_IRQ,
        MPS_INTI_ACTIVE_HIGH_LEVEL,
    ));
    // Local APIC NMI: all processors (uid 0xff), LINT1, bus-conforming polarity and trigger.
    madt.append_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.as_slice().to_vec()
}

/// MADT type 2: maps ISA IRQ `source` to `gsi` with MPS INTI `flags`.
fn interrupt_source_override(source: u8, gsi: u32, flags: u16) -> [u8; 10] {
    let mut e = [0u8; 10];
    e[0] = 2;
    e[1] = 10;
    e[2] = 0; // ISA bus
    e[3] = source;
    e[4..8].copy_from_slice(&gsi.to_le_bytes());
    e[8..10].copy_from_slice(&flags.to_le_bytes());
    e
}

/// Builds the MCFG: one ECAM region for segment 0 covering the buses `pci.ecam_size` holds.
pub fn build_mcfg(pci: &PciInfo) -> Vec<u8> {
    let buses = (pci.ecam_size >> 20).clamp(1, 256);
    let end_bus = u8::try_from(buses - 1).unwrap_or(u8::MAX);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, 0, 0, end_bus);
    aml_bytes(&mcfg)
}

/// Builds the FADT (not hardware-reduced) pointing at `dsdt` and `facs`.
pub fn build_fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .flag(Flags::Wbinvd)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.sci_int = (SCI_IRQ as u16).into();
    // SMI_CMD stays 0: the platform is always in ACPI mode.
    fadt.pm1a_evt_blk = u32::from(PM1A_EVT_PORT).into();
    fadt.pm1a_cnt_blk = u32::from(PM1A_CNT_PORT).into();
    fadt.pm1_evt_len = 4;
    fadt.pm1_cnt_len = 2;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH_VGA_NOT_PRESENT.into();
    fadt.x_pm1a_evt_blk = GAS::new(
        AddressSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_EVT_PORT),
    );
    fadt.x_pm1a_cnt_blk = GAS::new(
        AddressSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        u64::from(PM1A_CNT_PORT),
    );
    aml_bytes(&fadt.finalize())
}

/// Places tables one after the other in the ACPI area.
struct Placer {
    next: u64,
}

impl Placer {
    fn place(&mut self, len: usize, align: u64) -> u64 {
        let addr = self.next.next_multiple_of(align);
        self.next = addr + len as u64;
        addr
    }
}

/// Builds all ACPI tables for `nr_vcpus` vCPUs and `pci`, as (guest address, bytes) pairs.
///
/// The first pair is the RSDP at [`ACPI_START`].
pub fn build_acpi_tables(nr_vcpus: u8, pci: &PciInfo) -> Result<Vec<(u64, Vec<u8>)>, Error> {
    check_vcpu_count(nr_vcpus)?;
    let dsdt = build_dsdt(pci);
    let madt = build_madt(nr_vcpus);
    let mcfg = build_mcfg(pci);
    let facs = aml_bytes(&FACS::new());

    let mut placer = Placer { next: ACPI_START };
    let rsdp_addr = placer.place(Rsdp::len(), 16);
    const XSDT_LEN: usize = 36 + 3 * 8;
    let xsdt_addr = placer.place(XSDT_LEN, 16);
    let facs_addr = placer.place(facs.len(), 64);
    let dsdt_addr = placer.place(dsdt.len(), 16);
    let fadt = build_fadt(dsdt_addr, facs_addr);
    let fadt_addr = placer.place(fadt.len(), 16);
    let madt_addr = placer.place(madt.len(), 16);
    let mcfg_addr = placer.place(mcfg.len(), 16);
    if placer.next > ACPI_END {
        return Err(Error::AcpiTooLarge {
            size: placer.next - ACPI_START,
            available: ACPI_END - ACPI_START,
        });
    }

    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    xsdt.add_entry(mcfg_addr);
    let xsdt = aml_bytes(&xsdt);
    debug_assert_eq!(xsdt.len(), XSDT_LEN);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));

    Ok(vec![
        (rsdp_addr, rsdp),
        (xsdt_addr, xsdt),
        (facs_addr, facs),
        (dsdt_addr, dsdt),
        (fadt_addr, fadt),
        (madt_addr, madt),
        (mcfg_addr, mcfg),
    ])
}

/// Writes the ACPI tables into guest memory and returns the RSDP address.
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    nr_vcpus: u8,
    pci: &PciInfo,
) -> Result<GuestAddress, Error> {
    let tables = build_acpi_tables(nr_vcpus, pci)?;
    for (addr, bytes) in &tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(|source| Error::GuestMemory {
                what: "ACPI tables",
                source,
            })?;
    }
    Ok(GuestAddress(ACPI_START))
}
