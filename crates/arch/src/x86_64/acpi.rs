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
    ACPI_END, ACPI_START, COM1_IRQ, COM1_PORT, IOAPIC_START, LAPIC_START, PCI_MMIO64_SIZE,
    PCI_MMIO64_START, PM1A_CNT_PORT, PM1A_EVT_PORT, SCI_IRQ,
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
    // The 64-bit window above RAM, for 64-bit prefetchable BARs (a QWord memory range).
    let mmio64_window = aml::AddressSpace::new_memory(
        aml::AddressSpaceCacheable::PreFetchable,
        true,
        PCI_MMIO64_START,
        PCI_MMIO64_START + PCI_MMIO64_SIZE - 1,
        None,
    );
    let pci_crs = aml::ResourceTemplate::new(vec![
        &bus,
        &cfg_ports,
        &io_low,
        &io_high,
        mmio_window,
        &mmio64_window,
    ]);
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

/// The LAPIC and IOAPIC addresses as the MADT's 32-bit fields.
const LAPIC_ADDR32: u32 = super::fits_u32(LAPIC_START);
const IOAPIC_ADDR32: u32 = super::fits_u32(IOAPIC_START);
/// The SCI as an ISA IRQ number (the MADT override's source, the FADT's `SCI_INT`).
// The assert keeps it an ISA IRQ (below 16), so neither cast truncates.
#[allow(clippy::cast_possible_truncation)]
const SCI_ISA_IRQ: u8 = {
    assert!(SCI_IRQ < 16);
    SCI_IRQ as u8
};

/// Builds the MADT: one enabled local APIC per vCPU, the IOAPIC and the ISA overrides.
pub fn build_madt(nr_vcpus: u8) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    madt.write_u32(36, LAPIC_ADDR32);
    madt.write_u32(40, MADT_PCAT_COMPAT);
    for id in 0..nr_vcpus {
        madt.append_slice(&aml_bytes(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    madt.append_slice(&aml_bytes(&IoApic::new(0, IOAPIC_ADDR32, 0)));
    madt.append_slice(&interrupt_source_override(0, 2, MPS_INTI_CONFORMS));
    madt.append_slice(&interrupt_source_override(
        SCI_ISA_IRQ,
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
    fadt.sci_int = u16::from(SCI_ISA_IRQ).into();
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

/// A pointer field in [`AcpiBlobs`] that holds an offset into the tables blob, to become an
/// address once firmware has placed the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiPointer {
    /// Whether the field is in the RSDP (else in the tables blob).
    pub in_rsdp: bool,
    /// Offset of the field.
    pub offset: usize,
    /// Its width in bytes.
    pub size: u8,
}

/// A checksum byte in [`AcpiBlobs`] to fix once the pointers are patched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiChecksum {
    /// Whether the range is in the RSDP (else in the tables blob).
    pub in_rsdp: bool,
    /// Offset of the checksum byte.
    pub offset: usize,
    /// Start of the range that must sum to zero.
    pub start: usize,
    /// Length of that range.
    pub length: usize,
}

/// The ACPI tables as firmware takes them (QEMU's linker/loader model): the RSDP and one blob
/// with every other table, their pointers written as offsets into the blob (with valid
/// checksums over those offsets), and the fields firmware must relocate and re-checksum.
#[derive(Debug, Clone)]
pub struct AcpiBlobs {
    /// The RSDP (36 bytes, ACPI 2.0).
    pub rsdp: Vec<u8>,
    /// FACS (first, 64-byte aligned), DSDT, FADT, MADT, MCFG and XSDT.
    pub tables: Vec<u8>,
    /// The pointer fields to relocate.
    pub pointers: Vec<AcpiPointer>,
    /// The checksums to fix afterwards, in order.
    pub checksums: Vec<AcpiChecksum>,
}

/// Builds the tables of [`build_acpi_tables`] for firmware to place (see [`AcpiBlobs`]).
pub fn build_acpi_blobs(nr_vcpus: u8, pci: &PciInfo) -> Result<AcpiBlobs, Error> {
    check_vcpu_count(nr_vcpus)?;
    let facs = aml_bytes(&FACS::new());
    let dsdt = build_dsdt(pci);
    let madt = build_madt(nr_vcpus);
    let mcfg = build_mcfg(pci);

    let mut placer = Placer { next: 0 };
    let facs_at = placer.place(facs.len(), 64);
    let dsdt_at = placer.place(dsdt.len(), 16);
    let fadt = build_fadt(dsdt_at, facs_at);
    let fadt_at = placer.place(fadt.len(), 16);
    let madt_at = placer.place(madt.len(), 16);
    let mcfg_at = placer.place(mcfg.len(), 16);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    xsdt.add_entry(mcfg_at);
    let xsdt = aml_bytes(&xsdt);
    let xsdt_at = placer.place(xsdt.len(), 16);
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_at));

    let offset = |at: u64| {
        usize::try_from(at).map_err(|_| Error::AcpiTooLarge {
            size: at,
            available: u64::from(u32::MAX),
        })
    };
    let mut tables = vec![0u8; offset(placer.next)?];
    for (at, bytes) in [
        (facs_at, &facs),
        (dsdt_at, &dsdt),
        (fadt_at, &fadt),
        (madt_at, &madt),
        (mcfg_at, &mcfg),
        (xsdt_at, &xsdt),
    ] {
        let at = offset(at)?;
        tables[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let (fadt_at, xsdt_at) = (offset(fadt_at)?, offset(xsdt_at)?);
    let in_tables = |offset: usize| AcpiPointer {
        in_rsdp: false,
        offset,
        size: 8,
    };
    let mut pointers = vec![AcpiPointer {
        in_rsdp: true,
        offset: RSDP_XSDT_OFFSET,
        size: 8,
    }];
    pointers.push(in_tables(fadt_at + FADT_X_FIRMWARE_CTRL_OFFSET));
    pointers.push(in_tables(fadt_at + FADT_X_DSDT_OFFSET));
    pointers.extend((0..3).map(|i| in_tables(xsdt_at + SDT_HEADER_LEN + 8 * i)));
    let table_sum = |at: usize, len: usize| AcpiChecksum {
        in_rsdp: false,
        offset: at + SDT_CHECKSUM_OFFSET,
        start: at,
        length: len,
    };
    let checksums = vec![
        table_sum(fadt_at, fadt.len()),
        table_sum(xsdt_at, xsdt.len()),
        AcpiChecksum {
            in_rsdp: true,
            offset: RSDP_CHECKSUM_OFFSET,
            start: 0,
            length: RSDP_V1_LEN,
        },
        AcpiChecksum {
            in_rsdp: true,
            offset: RSDP_EXT_CHECKSUM_OFFSET,
            start: 0,
            length: rsdp.len(),
        },
    ];
    Ok(AcpiBlobs {
        rsdp,
        tables,
        pointers,
        checksums,
    })
}

/// Offset of the checksum byte in every table header.
const SDT_CHECKSUM_OFFSET: usize = 9;
/// Length of a table header (where the XSDT's entries start).
const SDT_HEADER_LEN: usize = 36;
/// The FADT's 64-bit FACS address.
const FADT_X_FIRMWARE_CTRL_OFFSET: usize = 132;
/// The FADT's 64-bit DSDT address.
const FADT_X_DSDT_OFFSET: usize = 140;
/// The RSDP's XSDT address.
const RSDP_XSDT_OFFSET: usize = 24;
/// The RSDP's checksum over its first 20 bytes (ACPI 1.0 part).
const RSDP_CHECKSUM_OFFSET: usize = 8;
/// Length of the ACPI 1.0 part of the RSDP.
const RSDP_V1_LEN: usize = 20;
/// The RSDP's extended checksum over all of it.
const RSDP_EXT_CHECKSUM_OFFSET: usize = 32;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::tests::guest_mem;
    use vm_memory::GuestMemoryMmap;

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// Reads a whole SDT at `addr`, checking its signature and checksum.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[0..4], sig);
        let len = u32_at(&header, 4) as usize;
        let table = read(mem, addr, len);
        assert_eq!(sum(&table), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert!(addr + len as u64 <= ACPI_END);
        table
    }

    /// Walks RSDP -> XSDT and returns the tables by signature.
    fn walk(mem: &GuestMemoryMmap) -> Vec<(String, u64, Vec<u8>)> {
        let rsdp = read(mem, ACPI_START, 36);
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt_addr = u64_at(&rsdp, 24);
        let xsdt = read_table(mem, xsdt_addr, b"XSDT");
        let mut tables = Vec::new();
        for off in (36..xsdt.len()).step_by(8) {
            let addr = u64_at(&xsdt, off);
            let sig = read(mem, addr, 4);
            let sig: [u8; 4] = sig.try_into().unwrap();
            tables.push((
                String::from_utf8_lossy(&sig).into_owned(),
                addr,
                read_table(mem, addr, &sig),
            ));
        }
        tables
    }

    fn find<'a>(tables: &'a [(String, u64, Vec<u8>)], sig: &str) -> &'a [u8] {
        &tables.iter().find(|t| t.0 == sig).unwrap().2
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let mem = guest_mem(64 << 20);
        let rsdp = create_acpi_tables(&mem, 4, &PciInfo::default()).unwrap();
        assert_eq!(rsdp, GuestAddress(ACPI_START));
        let tables = walk(&mem);
        let sigs: Vec<&str> = tables.iter().map(|t| t.0.as_str()).collect();
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);

        // FADT: PM blocks, SCI, flags, DSDT and FACS.
        let fadt = find(&tables, "FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI_INT");
        assert_eq!(u32_at(fadt, 48), 0, "SMI_CMD");
        assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
        assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
        assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1 lengths");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 4), 0, "PWR_BUTTON");
        assert_ne!(flags & (1 << 5), 0, "SLP_BUTTON");
        assert_eq!(flags & (1 << 20), 0, "not HW_REDUCED");
        assert_eq!(fadt[148], 1, "X_PM1a_EVT_BLK is I/O");
        assert_eq!(u64_at(fadt, 148 + 4), 0x600);
        assert_eq!(u64_at(fadt, 172 + 4), 0x604, "X_PM1a_CNT_BLK");
        let dsdt_addr = u64_at(fadt, 140);
        let facs_addr = u64_at(fadt, 132);
        assert_eq!(facs_addr % 64, 0);
        let facs = read(&mem, facs_addr, 64);
        assert_eq!(&facs[0..4], b"FACS");
        assert_eq!(u32_at(&facs, 4), 64);

        // DSDT: the objects the guest looks for.
        let dsdt = read_table(&mem, dsdt_addr, b"DSDT");
        for name in [
            &b"_S5_"[..],
            b"_SB_",
            b"PCI0",
            b"COM1",
            b"MBRD",
            b"_CRS",
            b"_HID",
            b"_CID",
        ] {
            assert!(contains(&dsdt, name), "{}", String::from_utf8_lossy(name));
        }
        // EISAID("PNP0A08") and EISAID("PNP0A03") as DWord constants.
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x08]));
        assert!(contains(&dsdt, &[0x0c, 0x41, 0xd0, 0x0a, 0x03]));
        // _S5_ = Package(4) { 0, 0, 0, 0 }.
        assert!(contains(
            &dsdt,
            &[b'_', b'S', b'5', b'_', 0x12, 0x06, 0x04, 0, 0, 0, 0]
        ));
        // DWordMemory window 0xC0000000-0xDFFFFFFF, length 0x20000000.
        let mut window = Vec::new();
        window.extend_from_slice(&0xC000_0000u32.to_le_bytes());
        window.extend_from_slice(&0xDFFF_FFFFu32.to_le_bytes());
        window.extend_from_slice(&0u32.to_le_bytes());
        window.extend_from_slice(&0x2000_0000u32.to_le_bytes());
        assert!(contains(&dsdt, &window));
        // QWordMemory window 0x110_0000_0000 + 64 GiB (granularity, min, max, translation,
        // length), prefetchable and read-write.
        let mut window64 = Vec::new();
        for v in [0u64, 0x110_0000_0000, 0x11F_FFFF_FFFF, 0, 0x10_0000_0000] {
            window64.extend_from_slice(&v.to_le_bytes());
        }
        let at = dsdt
            .windows(window64.len())
            .position(|w| w == window64)
            .expect("QWord 64-bit window in the DSDT");
        // Descriptor header: tag 0x8A, length 43, memory range, flags, type-specific (RW,
        // prefetchable: bits 1-2 = 3).
        assert_eq!(&dsdt[at - 6..at - 3], &[0x8a, 43, 0]);
        assert_eq!(dsdt[at - 3], 0);
        assert_eq!(dsdt[at - 1] & 0x7, 0x7);
        // IO(Decode16, 0xCF8, 0xCF8, 1, 8) and COM1 IO(0x3F8, 0x3F8, 0, 8).
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 0x0c, 0xf8, 0x0c, 1, 8]));
        assert!(contains(&dsdt, &[0x47, 1, 0xf8, 0x03, 0xf8, 0x03, 0, 8]));
        // Extended IRQ 4, edge, active high, consumer.
        assert!(contains(&dsdt, &[0x89, 6, 0, 0x03, 1, 4, 0, 0, 0]));

        // MADT: LAPIC address, PCAT_COMPAT, one LAPIC per vCPU, IOAPIC, overrides.
        let madt = find(&tables, "APIC");
        assert_eq!(u32_at(madt, 36), 0xFEE0_0000);
        assert_eq!(u32_at(madt, 40), 1);
        let mut off = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut overrides = Vec::new();
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            let e = &madt[off..off + len];
            match kind {
                0 => lapics.push((e[2], e[3], u32_at(e, 4))),
                1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
                2 => overrides.push((e[3], u32_at(e, 4), u16::from_le_bytes([e[8], e[9]]))),
                _ => {}
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, [(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
        assert_eq!(ioapics, [(0, 0xFEC0_0000, 0)]);
        assert_eq!(overrides, [(0, 2, 0), (9, 9, 0xd)]);

        // MCFG: ECAM base, segment 0, bus 0-0.
        let mcfg = find(&tables, "MCFG");
        assert_eq!(mcfg.len(), 36 + 8 + 16);
        assert_eq!(u64_at(mcfg, 44), 0xE000_0000);
        assert_eq!(u16::from_le_bytes([mcfg[52], mcfg[53]]), 0);
        assert_eq!((mcfg[54], mcfg[55]), (0, 0));
    }

    #[test]
    fn madt_grows_with_vcpus_and_fits() {
        let pci = PciInfo::default();
        for n in [1u8, 2, 64, 254] {
            let madt = build_madt(n);
            assert_eq!(madt.len(), 44 + 8 * n as usize + 12 + 2 * 10 + 6);
            assert_eq!(sum(&madt), 0);
            let tables = build_acpi_tables(n, &pci).unwrap();
            let end = tables
                .iter()
                .map(|(a, b)| a + b.len() as u64)
                .max()
                .unwrap();
            assert!(end <= ACPI_END);
        }
        assert!(matches!(
            build_acpi_tables(0, &pci),
            Err(Error::InvalidVcpuCount(0))
        ));
        assert!(matches!(
            build_acpi_tables(255, &pci),
            Err(Error::InvalidVcpuCount(255))
        ));
    }

    #[test]
    fn mcfg_covers_all_ecam_buses() {
        let pci = PciInfo {
            ecam_size: 4 << 20,
            ..PciInfo::default()
        };
        let mcfg = build_mcfg(&pci);
        assert_eq!(sum(&mcfg), 0);
        assert_eq!((mcfg[54], mcfg[55]), (0, 3));
    }
}
