//! Firmware as the guest (SeaBIOS, OVMF): the ROM image mapped read-only just below 4 GiB,
//! its last 128 KiB copied to 0xE0000 (the legacy BIOS area real mode reaches), vCPU 0 left
//! at the x86 reset vector, and the fw_cfg items firmware reads: the memory map
//! (`etc/e820`), the vCPU count and the ACPI tables with the loader script that places them
//! (`etc/table-loader`, `etc/acpi/rsdp`, `etc/acpi/tables`).

use std::fs::File;
use std::io::Read;

use devices::legacy::FwCfg;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{Cap, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, MmapRegion, VolatileMemory};

use super::acpi::build_acpi_blobs;
use super::boot::{E820Entry, E820Type};
use super::layout::{low_ram_end, MMIO_HOLE_END};
use super::{kvm_err, BootProtocol, BootSetup, Error, PciInfo};

/// Where the ROM ends (exclusive): the top of the 32-bit address space.
pub const ROM_END: u64 = 0x1_0000_0000;
/// The smallest ROM accepted (SeaBIOS's `bios.bin` is 128 KiB).
pub const ROM_MIN: u64 = 64 << 10;
/// The largest ROM accepted (OVMF's 4 MiB build, with room to spare).
pub const ROM_MAX: u64 = 16 << 20;
/// The legacy BIOS area below 1 MiB that receives the ROM's last bytes.
pub const LEGACY_BIOS_START: u64 = 0xE_0000;
/// End (exclusive) of the legacy BIOS area.
pub const LEGACY_BIOS_END: u64 = 0x10_0000;
/// The KVM memory slot of the ROM (RAM takes the slots from 0 up).
pub const ROM_SLOT: u32 = 16;
/// The x86 reset vector: where vCPU 0 starts (CS base 0xFFFF0000, IP 0xFFF0).
pub const RESET_VECTOR: u64 = 0xFFFF_FFF0;

/// A firmware ROM mapped into a VM: keep it for as long as the VM exists.
pub struct FirmwareRom {
    /// The host mapping KVM reads the ROM from.
    _mapping: MmapRegion,
    /// Where the ROM starts in guest physical memory.
    pub base: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Whether KVM maps it read-only (guest writes exit to the VMM and are dropped);
    /// without `KVM_CAP_READONLY_MEM` it is ordinary memory the guest could scribble on.
    pub read_only: bool,
}

/// Reads a firmware image: 64 KiB to 16 MiB, a whole number of 4 KiB pages.
pub fn read_firmware(file: &mut File) -> Result<Vec<u8>, Error> {
    let size = file.metadata().map_err(Error::FirmwareRead)?.len();
    if !(ROM_MIN..=ROM_MAX).contains(&size) || !size.is_multiple_of(4096) {
        return Err(Error::FirmwareSize(size));
    }
    let len = usize::try_from(size).map_err(|_| Error::FirmwareSize(size))?;
    let mut image = vec![0u8; len];
    file.read_exact(&mut image).map_err(Error::FirmwareRead)?;
    Ok(image)
}

/// Maps `image` (from [`read_firmware`]) into the VM so that it ends at [`ROM_END`],
/// read-only where KVM can do that.
pub fn map_firmware(vm: &VmFd, image: &[u8]) -> Result<FirmwareRom, Error> {
    let len = image.len();
    let size = u64::try_from(len).map_err(|_| Error::FirmwareSize(u64::MAX))?;
    if !(ROM_MIN..=ROM_MAX).contains(&size) || !size.is_multiple_of(4096) {
        return Err(Error::FirmwareSize(size));
    }
    let mapping = MmapRegion::new(len).map_err(|e| Error::FirmwareMap(e.to_string()))?;
    mapping
        .get_slice(0, len)
        .map_err(|e| Error::FirmwareMap(e.to_string()))?
        .copy_from(image);
    let base = ROM_END - size;
    let read_only = vm.check_extension(Cap::ReadonlyMem);
    let region = kvm_userspace_memory_region {
        slot: ROM_SLOT,
        guest_phys_addr: base,
        memory_size: size,
        userspace_addr: mapping.as_ptr() as u64,
        flags: if read_only { KVM_MEM_READONLY } else { 0 },
    };
    // SAFETY: `mapping` is a live anonymous mapping of `size` bytes that the returned
    // `FirmwareRom` owns; the VM keeps it for as long as the VM exists.
    unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("map the firmware ROM"))?;
    Ok(FirmwareRom {
        _mapping: mapping,
        base,
        size,
        read_only,
    })
}

/// Boots firmware: reads the image `file`, maps it below 4 GiB, copies its last 128 KiB (or
/// all of it when smaller) to the top of the legacy BIOS area in `mem`, and returns the ROM
/// with where vCPU 0 starts.
pub fn load_firmware<M: GuestMemoryBackend>(
    vm: &VmFd,
    mem: &M,
    file: &mut File,
) -> Result<(FirmwareRom, BootSetup), Error> {
    let image = read_firmware(file)?;
    let rom = map_firmware(vm, &image)?;
    let shadow_len = (LEGACY_BIOS_END - LEGACY_BIOS_START).min(rom.size);
    let shadow_start =
        image.len() - usize::try_from(shadow_len).map_err(|_| Error::FirmwareSize(rom.size))?;
    mem.write_slice(
        &image[shadow_start..],
        GuestAddress(LEGACY_BIOS_END - shadow_len),
    )
    .map_err(|source| Error::GuestMemory {
        what: "the firmware's legacy BIOS copy",
        source,
    })?;
    let boot = BootSetup {
        entry: GuestAddress(RESET_VECTOR),
        protocol: BootProtocol::Firmware,
        params: GuestAddress(0),
    };
    Ok((rom, boot))
}

/// The memory map firmware is given: RAM from 0 to the MMIO hole (firmware reserves its own
/// areas below 1 MiB), the RAM above 4 GiB, and the PCI ECAM reserved.
pub fn firmware_e820(mem_size: u64, pci: &PciInfo) -> Vec<E820Entry> {
    let low = low_ram_end(mem_size);
    let mut map = vec![E820Entry {
        addr: 0,
        size: low,
        kind: E820Type::Ram,
    }];
    if pci.ecam_size > 0 {
        map.push(E820Entry {
            addr: pci.ecam_base,
            size: pci.ecam_size,
            kind: E820Type::Reserved,
        });
    }
    if mem_size > low {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - low,
            kind: E820Type::Ram,
        });
    }
    map
}

/// `etc/e820` as QEMU lays it out: per entry its address and length (u64) and type (u32),
/// little-endian, packed.
fn e820_file(map: &[E820Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(map.len() * 20);
    for e in map {
        out.extend_from_slice(&e.addr.to_le_bytes());
        out.extend_from_slice(&e.size.to_le_bytes());
        out.extend_from_slice(&(e.kind as u32).to_le_bytes());
    }
    out
}

/// Loader commands (QEMU's `etc/table-loader`): 128-byte entries.
mod loader {
    /// Allocate a file's contents in a zone and copy them there.
    pub const ALLOCATE: u32 = 1;
    /// Add a file's allocated address to a pointer in another file.
    pub const ADD_POINTER: u32 = 2;
    /// Fix a checksum byte so the bytes of a range sum to 0.
    pub const ADD_CHECKSUM: u32 = 3;
    /// Allocate anywhere in 32-bit memory.
    pub const ZONE_HIGH: u8 = 1;
    /// Allocate in the 0xF0000 segment (where the RSDP must be for BIOS boots).
    pub const ZONE_FSEG: u8 = 2;
    /// Size of a file name field.
    pub const NAME: usize = 56;
    /// Size of one entry.
    pub const ENTRY: usize = 128;
}

/// The fw_cfg file holding the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// The fw_cfg file holding every other ACPI table.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// The fw_cfg file with the loader script.
pub const LOADER_FILE: &str = "etc/table-loader";

fn name_field(name: &str) -> [u8; loader::NAME] {
    let mut f = [0u8; loader::NAME];
    f[..name.len()].copy_from_slice(name.as_bytes());
    f
}

fn entry(command: u32, body: &[u8]) -> Vec<u8> {
    let mut e = command.to_le_bytes().to_vec();
    e.extend_from_slice(body);
    e.resize(loader::ENTRY, 0);
    e
}

fn allocate(file: &str, align: u32, zone: u8) -> Vec<u8> {
    let mut b = name_field(file).to_vec();
    b.extend_from_slice(&align.to_le_bytes());
    b.push(zone);
    entry(loader::ALLOCATE, &b)
}

fn add_pointer(dest: &str, src: &str, offset: u32, size: u8) -> Vec<u8> {
    let mut b = name_field(dest).to_vec();
    b.extend_from_slice(&name_field(src));
    b.extend_from_slice(&offset.to_le_bytes());
    b.push(size);
    entry(loader::ADD_POINTER, &b)
}

fn add_checksum(file: &str, offset: u32, start: u32, length: u32) -> Vec<u8> {
    let mut b = name_field(file).to_vec();
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&start.to_le_bytes());
    b.extend_from_slice(&length.to_le_bytes());
    entry(loader::ADD_CHECKSUM, &b)
}

/// The fw_cfg device of a firmware-booted guest with `mem_size` bytes of RAM and `nr_vcpus`
/// vCPUs: the memory map and the platform's ACPI tables (the same the direct kernel boot
/// writes, power-off through the PM1a block included) with their loader script.
pub fn firmware_fw_cfg(mem_size: u64, nr_vcpus: u8, pci: &PciInfo) -> Result<FwCfg, Error> {
    let mut cfg = FwCfg::new(u16::from(nr_vcpus));
    let fw = |e: devices::legacy::FwCfgError| Error::FirmwareConfig(e.to_string());
    cfg.add_file("etc/e820", e820_file(&firmware_e820(mem_size, pci)))
        .map_err(fw)?;

    let acpi = build_acpi_blobs(nr_vcpus, pci)?;
    let u32_of = |v: usize| u32::try_from(v).map_err(|_| Error::FirmwareConfig("ACPI blob".into()));
    let mut script = Vec::new();
    script.extend(allocate(RSDP_FILE, 16, loader::ZONE_FSEG));
    script.extend(allocate(TABLES_FILE, 64, loader::ZONE_HIGH));
    for p in &acpi.pointers {
        let (dest, size) = match p.in_rsdp {
            true => (RSDP_FILE, p.size),
            false => (TABLES_FILE, p.size),
        };
        script.extend(add_pointer(dest, TABLES_FILE, u32_of(p.offset)?, size));
    }
    for c in &acpi.checksums {
        let file = if c.in_rsdp { RSDP_FILE } else { TABLES_FILE };
        script.extend(add_checksum(
            file,
            u32_of(c.offset)?,
            u32_of(c.start)?,
            u32_of(c.length)?,
        ));
    }
    cfg.add_file(RSDP_FILE, acpi.rsdp).map_err(fw)?;
    cfg.add_file(TABLES_FILE, acpi.tables).map_err(fw)?;
    cfg.add_file(LOADER_FILE, script).map_err(fw)?;
    Ok(cfg)
}

#[cfg(test)]
// Offsets into test blobs of a few hundred bytes: the casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;
    use crate::layout::{PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START};
    use devices::bus::BusDevice;

    fn pci() -> PciInfo {
        PciInfo {
            ecam_base: PCI_ECAM_START,
            ecam_size: PCI_ECAM_SIZE,
            mmio_base: PCI_MMIO_START,
            mmio_size: PCI_MMIO_SIZE,
        }
    }

    /// Reads fw_cfg file `name` through the ports, as firmware does.
    fn read_file(cfg: &mut FwCfg, name: &str) -> Vec<u8> {
        cfg.write(0, &0x19u16.to_le_bytes());
        let mut count = [0u8; 4];
        cfg.read(1, &mut count);
        for _ in 0..u32::from_be_bytes(count) {
            let mut e = [0u8; 64];
            cfg.read(1, &mut e);
            let size = u32::from_be_bytes(e[..4].try_into().unwrap()) as usize;
            let select = u16::from_be_bytes(e[4..6].try_into().unwrap());
            let n = e[8..].iter().position(|&b| b == 0).unwrap();
            if &e[8..8 + n] == name.as_bytes() {
                cfg.write(0, &select.to_le_bytes());
                let mut data = vec![0u8; size];
                cfg.read(1, &mut data);
                return data;
            }
        }
        panic!("no fw_cfg file {name}");
    }

    #[test]
    fn e820_gives_low_and_high_ram_and_reserves_the_ecam() {
        let mut cfg = firmware_fw_cfg(4 << 30, 2, &pci()).unwrap();
        let e820 = read_file(&mut cfg, "etc/e820");
        let entries: Vec<(u64, u64, u32)> = e820
            .chunks(20)
            .map(|c| {
                (
                    u64::from_le_bytes(c[..8].try_into().unwrap()),
                    u64::from_le_bytes(c[8..16].try_into().unwrap()),
                    u32::from_le_bytes(c[16..].try_into().unwrap()),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                (0, 3 << 30, 1),
                (PCI_ECAM_START, PCI_ECAM_SIZE, 2),
                (1 << 32, 1 << 30, 1)
            ]
        );
    }

    /// Runs the loader script the way firmware does, with the files placed at fixed
    /// addresses, and checks the tables it yields: valid checksums, pointers that land on
    /// the tables they name.
    #[test]
    fn the_table_loader_yields_linked_tables_with_valid_checksums() {
        let mut cfg = firmware_fw_cfg(512 << 20, 2, &pci()).unwrap();
        let script = read_file(&mut cfg, LOADER_FILE);
        let mut rsdp = read_file(&mut cfg, RSDP_FILE);
        let mut tables = read_file(&mut cfg, TABLES_FILE);
        let tables_at = 0x1FF0_0000u64;
        assert_eq!(script.len() % 128, 0);
        for e in script.chunks(128) {
            let cmd = u32::from_le_bytes(e[..4].try_into().unwrap());
            let name = |at: usize| {
                let n = e[at..at + 56].iter().position(|&b| b == 0).unwrap();
                String::from_utf8(e[at..at + n].to_vec()).unwrap()
            };
            match cmd {
                1 => assert!([RSDP_FILE, TABLES_FILE].contains(&name(4).as_str())),
                2 => {
                    let (dest, src) = (name(4), name(60));
                    assert_eq!(src, TABLES_FILE);
                    let off = u32::from_le_bytes(e[116..120].try_into().unwrap()) as usize;
                    let size = e[120] as usize;
                    let d = if dest == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&d[off..off + size]);
                    let patched = u64::from_le_bytes(v) + tables_at;
                    d[off..off + size].copy_from_slice(&patched.to_le_bytes()[..size]);
                }
                3 => {
                    let f = name(4);
                    let word = |at: usize| u32::from_le_bytes(e[at..at + 4].try_into().unwrap());
                    let (off, start, len) = (word(60) as usize, word(64) as usize, word(68));
                    let d = if f == RSDP_FILE {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let sum = d[start..start + len as usize]
                        .iter()
                        .fold(0u8, |a, &b| a.wrapping_add(b));
                    d[off] = d[off].wrapping_sub(sum);
                }
                other => panic!("unknown loader command {other}"),
            }
        }
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, &x| a.wrapping_add(x));
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(&rsdp[..36]), 0);
        let xsdt_at = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let table = |at: u64| {
            let off = (at - tables_at) as usize;
            let len = u32::from_le_bytes(tables[off + 4..off + 8].try_into().unwrap()) as usize;
            &tables[off..off + len]
        };
        let xsdt = table(xsdt_at);
        assert_eq!(&xsdt[..4], b"XSDT");
        assert_eq!(sum(xsdt), 0);
        let mut sigs = Vec::new();
        for p in xsdt[36..].chunks(8) {
            let t = table(u64::from_le_bytes(p.try_into().unwrap()));
            assert_eq!(sum(t), 0, "{:?}", &t[..4]);
            sigs.push(String::from_utf8(t[..4].to_vec()).unwrap());
            if &t[..4] == b"FACP" {
                let dsdt = table(u64::from_le_bytes(t[140..148].try_into().unwrap()));
                assert_eq!(&dsdt[..4], b"DSDT");
                assert_eq!(sum(dsdt), 0);
                let facs_at = u64::from_le_bytes(t[132..140].try_into().unwrap());
                let off = (facs_at - tables_at) as usize;
                assert_eq!(&tables[off..off + 4], b"FACS");
                assert_eq!(facs_at % 64, 0);
            }
        }
        assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    }
}
