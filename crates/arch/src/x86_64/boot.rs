//! Kernel loading (PVH ELF or bzImage), initrd, command line, memory map and boot parameters.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::acpi::create_acpi_tables;
use super::layout::{
    low_ram_end, ACPI_END, ACPI_START, CMDLINE_ADDR, CMDLINE_MAX, HIMEM_START, IOAPIC_SIZE,
    IOAPIC_START, LAPIC_SIZE, LAPIC_START, LOW_RAM_END, MIN_MEMORY, MMIO_HOLE_END, PVH_MEMMAP_ADDR,
    PVH_MODLIST_ADDR, START_INFO_ADDR, START_INFO_END,
};
use super::{check_vcpu_count, BootConfig, BootProtocol, BootSetup, Error, PciInfo};

/// Kind of a memory map entry (e820 types, shared by the PVH memmap).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM, not for the OS to use.
    Reserved = 2,
    /// ACPI tables, reclaimable after parsing.
    Acpi = 3,
}

/// One memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Kind.
    pub kind: E820Type,
}

/// The memory map of a guest with `mem_size` bytes of RAM, sorted by address.
///
/// RAM: [0, 640 KiB), [1 MiB, min(size, 3 GiB)), [4 GiB, 4 GiB + rest). Reserved: the ACPI area
/// 0xE0000-0xFFFFF, the PCI ECAM, the IOAPIC and the local APIC.
pub fn e820_map(mem_size: u64, pci: &PciInfo) -> Vec<E820Entry> {
    let entry = |addr, size, kind| E820Entry { addr, size, kind };
    let low_end = low_ram_end(mem_size);
    let mut map = vec![entry(0, LOW_RAM_END.min(low_end), E820Type::Ram)];
    if low_end > ACPI_START {
        map.push(entry(
            ACPI_START,
            ACPI_END.min(low_end) - ACPI_START,
            E820Type::Reserved,
        ));
    }
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820Type::Ram));
    }
    if pci.ecam_size > 0 {
        map.push(entry(pci.ecam_base, pci.ecam_size, E820Type::Reserved));
    }
    map.push(entry(IOAPIC_START, IOAPIC_SIZE, E820Type::Reserved));
    map.push(entry(LAPIC_START, LAPIC_SIZE, E820Type::Reserved));
    let high = mem_size - low_end;
    if high > 0 {
        map.push(entry(MMIO_HOLE_END, high, E820Type::Ram));
    }
    map.sort_by_key(|e| e.addr);
    map
}

/// "HdrS" in the setup header.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Setup header `boot_flag` value.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader`: undefined boot loader.
const LOADER_TYPE_OTHER: u8 = 0xff;
/// xloadflags: the kernel has the 64-bit entry point at load address + 0x200.
const XLF_KERNEL_64: u16 = 1;
/// First boot protocol version with xloadflags.
const MIN_64BIT_PROTOCOL: u16 = 0x20c;
/// Offset of the 64-bit entry from the protected-mode kernel load address.
const STARTUP_64_OFFSET: u64 = 0x200;
/// initrd_addr_max for boot protocols older than 2.03.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// ELF program header type of loadable segments.
const PT_LOAD: u32 = 1;
const PAGE_SIZE: u64 = 0x1000;

fn kernel_read(kernel: &mut File, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
    kernel
        .seek(SeekFrom::Start(offset))
        .map_err(Error::KernelRead)?;
    kernel.read_exact(buf).map_err(Error::KernelRead)
}

fn le_u16(b: &[u8], off: usize) -> u16 {
    let mut v = [0u8; 2];
    if let Some(s) = b.get(off..off + 2) {
        v.copy_from_slice(s);
    }
    u16::from_le_bytes(v)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        v.copy_from_slice(s);
    }
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        v.copy_from_slice(s);
    }
    u64::from_le_bytes(v)
}

/// True if [addr, addr + size) lies in guest RAM at or above 1 MiB.
fn in_kernel_ram(addr: u64, size: u64, mem_size: u64) -> bool {
    let Some(end) = addr.checked_add(size) else {
        return false;
    };
    let low_end = low_ram_end(mem_size);
    let high_end = MMIO_HOLE_END + (mem_size - low_end);
    (addr >= HIMEM_START && end <= low_end)
        || (mem_size > low_end && addr >= MMIO_HOLE_END && end <= high_end)
}

/// Checks the ELF header and that every loadable segment lands in RAM above 1 MiB.
fn check_elf_segments(kernel: &mut File, mem_size: u64) -> Result<(), Error> {
    let mut ehdr = [0u8; 64];
    kernel_read(kernel, 0, &mut ehdr).map_err(|_| Error::ElfMalformed("truncated ELF header"))?;
    if ehdr[4] != 2 {
        return Err(Error::ElfMalformed("only 64-bit ELF kernels are supported"));
    }
    let phoff = le_u64(&ehdr, 0x20);
    let phentsize = le_u16(&ehdr, 0x36);
    let phnum = le_u16(&ehdr, 0x38);
    if phentsize != 56 {
        return Err(Error::ElfMalformed("unexpected program header size"));
    }
    let mut phdrs = vec![0u8; usize::from(phnum) * 56];
    kernel_read(kernel, phoff, &mut phdrs)
        .map_err(|_| Error::ElfMalformed("truncated program headers"))?;
    for phdr in phdrs.chunks_exact(56) {
        let p_type = le_u32(phdr, 0);
        let paddr = le_u64(phdr, 24);
        let filesz = le_u64(phdr, 32);
        let memsz = le_u64(phdr, 40);
        if p_type != PT_LOAD || (filesz == 0 && memsz == 0) {
            continue;
        }
        if filesz > memsz {
            return Err(Error::ElfMalformed(
                "segment file size exceeds its memory size",
            ));
        }
        if !in_kernel_ram(paddr, memsz, mem_size) {
            return Err(Error::ElfSegment {
                addr: paddr,
                size: memsz,
            });
        }
    }
    Ok(())
}

/// What the kernel loader found.
struct LoadedKernel {
    entry: GuestAddress,
    protocol: BootProtocol,
    /// End of memory the kernel occupies or will unpack into.
    footprint_end: u64,
    /// The bzImage setup header (Linux64 only).
    setup: Option<setup_header>,
}

fn load_elf<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    mem_size: u64,
) -> Result<LoadedKernel, Error> {
    check_elf_segments(kernel, mem_size)?;
    let result = Elf::load(mem, None, kernel, None).map_err(Error::ElfLoad)?;
    match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if !in_kernel_ram(entry.0, 1, mem_size) => {
            Err(Error::InvalidEntry(entry.0))
        }
        PvhBootCapability::PvhEntryPresent(entry) => Ok(LoadedKernel {
            entry,
            protocol: BootProtocol::Pvh,
            footprint_end: result.kernel_end,
            setup: None,
        }),
        _ => Err(Error::ElfWithoutPvh),
    }
}

fn load_bzimage<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    mem_size: u64,
) -> Result<LoadedKernel, Error> {
    // The setup header runs from 0x1f1 to 0x268 in current protocol versions.
    let mut hdr = [0u8; 0x268];
    kernel_read(kernel, 0, &mut hdr).map_err(|_| Error::NotAKernel)?;
    check_bzimage_header(&hdr)?;

    let result = BzImage::load(mem, None, kernel, Some(GuestAddress(HIMEM_START)))
        .map_err(Error::BzImageLoad)?;
    let setup = result.setup_header.ok_or(Error::NotAKernel)?;
    let load = result.kernel_load.raw_value();
    // The decompressor unpacks to max(load address, pref_address) and needs init_size bytes.
    let unpack_end = load
        .max(setup.pref_address)
        .saturating_add(u64::from(setup.init_size));
    let footprint_end = result.kernel_end.max(unpack_end);
    if !in_kernel_ram(load, footprint_end - load, mem_size) {
        return Err(Error::MemoryTooSmall {
            size: mem_size,
            min: footprint_end,
        });
    }
    Ok(LoadedKernel {
        entry: GuestAddress(load + STARTUP_64_OFFSET),
        protocol: BootProtocol::Linux64,
        footprint_end,
        setup: Some(setup),
    })
}

/// Checks the raw first 0x268 bytes of a bzImage: magic, protocol version and 64-bit entry.
pub fn check_bzimage_header(image: &[u8]) -> Result<(), Error> {
    if image.len() < 0x238 || le_u32(image, 0x202) != HDRS_MAGIC {
        return Err(Error::NotAKernel);
    }
    let version = le_u16(image, 0x206);
    let xloadflags = le_u16(image, 0x236);
    if version < MIN_64BIT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::BzImageNot64Bit {
            version,
            xloadflags,
        });
    }
    Ok(())
}

/// Checks the command line and returns its bytes with the terminating NUL.
fn cmdline_bytes(cmdline: &str, max_with_nul: usize) -> Result<Vec<u8>, Error> {
    if cmdline.as_bytes().contains(&0) {
        return Err(Error::CmdlineNul);
    }
    let len = cmdline.len() + 1;
    if len > max_with_nul {
        return Err(Error::CmdlineTooLong {
            len,
            max: max_with_nul,
        });
    }
    let mut bytes = Vec::with_capacity(len);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    Ok(bytes)
}

/// Where the initrd goes: page aligned, as high as possible below `limit`, above `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Result<u64, Error> {
    let too_large = Error::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    };
    let floor = kernel_end.checked_next_multiple_of(PAGE_SIZE);
    let addr = limit.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    match (floor, addr) {
        (Some(floor), Some(addr)) if addr >= floor => Ok(addr),
        _ => Err(too_large),
    }
}

/// Loads the initrd; returns its (address, size), or `None` for an empty file.
fn load_initrd<M: GuestMemoryBackend>(
    mem: &M,
    initrd: &mut File,
    kernel_end: u64,
    limit: u64,
) -> Result<Option<(u64, u64)>, Error> {
    let size = initrd.metadata().map_err(Error::InitrdRead)?.len();
    if size == 0 {
        return Ok(None);
    }
    let addr = initrd_address(size, kernel_end, limit)?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge {
        size,
        kernel_end,
        limit,
    })?;
    initrd.rewind().map_err(Error::InitrdRead)?;
    mem.read_exact_volatile_from(GuestAddress(addr), initrd, len)
        .map_err(|source| Error::GuestMemory {
            what: "the initrd",
            source,
        })?;
    Ok(Some((addr, size)))
}

fn write_pvh_params<M: GuestMemoryBackend>(
    mem: &M,
    map: &[E820Entry],
    initrd: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let area = usize::try_from(START_INFO_END - PVH_MEMMAP_ADDR).unwrap_or(0);
    let max_entries = area / std::mem::size_of::<hvm_memmap_table_entry>();
    if map.len() > max_entries {
        return Err(Error::TooManyMemoryMapEntries(map.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: rsdp.raw_value(),
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: u32::try_from(memmap.len())
            .map_err(|_| Error::TooManyMemoryMapEntries(memmap.len()))?,
        ..Default::default()
    };
    let module = initrd.map(|(paddr, size)| hvm_modlist_entry {
        paddr,
        size,
        ..Default::default()
    });
    if module.is_some() {
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(Error::BootParams)
}

fn write_zero_page<M: GuestMemoryBackend>(
    mem: &M,
    setup: setup_header,
    map: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    rsdp: GuestAddress,
) -> Result<(), Error> {
    let mut params = boot_params {
        hdr: setup,
        acpi_rsdp_addr: rsdp.raw_value(),
        ..Default::default()
    };
    if map.len() > params.e820_table.len() {
        return Err(Error::TooManyMemoryMapEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| Error::TooManyMemoryMapEntries(map.len()))?;
    params.hdr.type_of_loader = LOADER_TYPE_OTHER;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    params.hdr.cmd_line_ptr = const { super::fits_u32(CMDLINE_ADDR) };
    params.hdr.cmdline_size = u32::try_from(cmdline_len).map_err(|_| Error::CmdlineTooLong {
        len: cmdline_len,
        max: CMDLINE_MAX,
    })?;
    if let Some((addr, size)) = initrd {
        // initrd_address keeps the initrd below initrd_addr_max, which is below 4 GiB.
        let too_large = || Error::InitrdTooLarge {
            size,
            kernel_end: addr,
            limit: u64::from(u32::MAX),
        };
        params.hdr.ramdisk_image = u32::try_from(addr).map_err(|_| too_large())?;
        params.hdr.ramdisk_size = u32::try_from(size).map_err(|_| too_large())?;
    }
    let bp = BootParams::new(&params, GuestAddress(START_INFO_ADDR));
    LinuxBootConfigurator::write_bootparams(&bp, mem).map_err(Error::BootParams)
}

/// Loads `kernel` and everything it boots with; returns where to start.
///
/// An ELF kernel must carry a PVH entry note (booted with [`BootProtocol::Pvh`]); anything else
/// must be a bzImage supporting the 64-bit entry ([`BootProtocol::Linux64`]). The optional initrd
/// goes page aligned at the top of RAM below 3 GiB (and below the kernel's `initrd_addr_max`).
/// The command line, the memory map (e820 or PVH memmap) and the ACPI tables are written too.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cfg: &BootConfig,
) -> Result<BootSetup, Error> {
    check_vcpu_count(cfg.nr_vcpus)?;
    if cfg.mem_size < MIN_MEMORY {
        return Err(Error::MemoryTooSmall {
            size: cfg.mem_size,
            min: MIN_MEMORY,
        });
    }

    let mut magic = [0u8; 4];
    kernel_read(kernel, 0, &mut magic).map_err(|_| Error::NotAKernel)?;
    let loaded = if magic == *b"\x7fELF" {
        load_elf(mem, kernel, cfg.mem_size)?
    } else {
        load_bzimage(mem, kernel, cfg.mem_size)?
    };

    // The kernel's own limit (bzImage) on the command line, without the NUL.
    let cmdline_max = match &loaded.setup {
        Some(s) if s.version >= 0x206 => {
            (s.cmdline_size as usize).saturating_add(1).min(CMDLINE_MAX)
        }
        Some(_) => 256,
        None => CMDLINE_MAX,
    };
    let cmdline = cmdline_bytes(cfg.cmdline, cmdline_max)?;
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| Error::GuestMemory {
            what: "the command line",
            source,
        })?;

    let mut initrd_limit = low_ram_end(cfg.mem_size);
    if let Some(s) = &loaded.setup {
        let max = if s.version >= 0x203 {
            u64::from(s.initrd_addr_max)
        } else {
            DEFAULT_INITRD_ADDR_MAX
        };
        initrd_limit = initrd_limit.min(max + 1);
    }
    let initrd = match initrd {
        Some(file) => load_initrd(mem, file, loaded.footprint_end, initrd_limit)?,
        None => None,
    };

    let rsdp = create_acpi_tables(mem, cfg.nr_vcpus, &cfg.pci)?;
    let map = e820_map(cfg.mem_size, &cfg.pci);
    match loaded.setup {
        None => write_pvh_params(mem, &map, initrd, rsdp)?,
        Some(setup) => write_zero_page(mem, setup, &map, cmdline.len() - 1, initrd, rsdp)?,
    }

    Ok(BootSetup {
        entry: loaded.entry,
        protocol: loaded.protocol,
        params: GuestAddress(START_INFO_ADDR),
    })
}

#[cfg(test)]
// Test inputs are small constants and indices; their casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;
    use std::path::PathBuf;
    use vm_memory::GuestMemoryMmap;

    use crate::layout::{ram_regions, PCI_ECAM_SIZE, PCI_ECAM_START};

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    /// A file in the temp dir removed on drop.
    pub(crate) struct TempFile {
        pub path: PathBuf,
        pub file: File,
    }

    impl TempFile {
        pub fn with_bytes(tag: &str, bytes: &[u8]) -> TempFile {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("arch-test-{}-{tag}-{n}", std::process::id()));
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            file.write_all(bytes).unwrap();
            file.rewind().unwrap();
            TempFile { path, file }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    pub(crate) fn guest_mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&ram_regions(size)).unwrap()
    }

    fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
        buf[off..off + bytes.len()].copy_from_slice(bytes);
    }

    /// A minimal ELF64 kernel: one loadable segment at `paddr` holding `payload`, and optionally
    /// a PT_NOTE with the Xen PVH entry note pointing at `pvh_entry`.
    pub(crate) fn tiny_elf(paddr: u64, payload: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let mut img = vec![0u8; 0x1000 + payload.len()];
        put(&mut img, 0, b"\x7fELF");
        img[4] = 2; // ELFCLASS64
        img[5] = 1; // little endian
        img[6] = 1; // EV_CURRENT
        put(&mut img, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut img, 18, &0x3eu16.to_le_bytes()); // EM_X86_64
        put(&mut img, 20, &1u32.to_le_bytes());
        put(&mut img, 24, &paddr.to_le_bytes()); // e_entry
        put(&mut img, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut img, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut img, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut img, 56, &phnum.to_le_bytes());
        put(&mut img, 58, &64u16.to_le_bytes()); // e_shentsize
                                                 // PT_LOAD
        let ph = 64;
        put(&mut img, ph, &PT_LOAD.to_le_bytes());
        put(&mut img, ph + 4, &5u32.to_le_bytes()); // R+X
        put(&mut img, ph + 8, &0x1000u64.to_le_bytes()); // p_offset
        put(&mut img, ph + 16, &paddr.to_le_bytes()); // p_vaddr
        put(&mut img, ph + 24, &paddr.to_le_bytes()); // p_paddr
        put(&mut img, ph + 32, &(payload.len() as u64).to_le_bytes());
        put(
            &mut img,
            ph + 40,
            &(payload.len() as u64 + 0x100).to_le_bytes(),
        );
        put(&mut img, ph + 48, &0x1000u64.to_le_bytes());
        if let Some(entry) = pvh_entry {
            // The note lives at 0x200: an unrelated note first, then the PVH one.
            let note_off = 0x200usize;
            let mut note = Vec::new();
            // GNU build-id style note to skip.
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&3u32.to_le_bytes());
            note.extend_from_slice(&3u32.to_le_bytes());
            note.extend_from_slice(b"GNU\0");
            note.extend_from_slice(&[1, 2, 3, 0]);
            // XEN_ELFNOTE_PHYS32_ENTRY
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&18u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&entry.to_le_bytes());
            put(&mut img, note_off, &note);
            let ph = 64 + 56;
            put(&mut img, ph, &4u32.to_le_bytes()); // PT_NOTE
            put(&mut img, ph + 8, &(note_off as u64).to_le_bytes());
            put(&mut img, ph + 32, &(note.len() as u64).to_le_bytes());
            put(&mut img, ph + 40, &(note.len() as u64).to_le_bytes());
            put(&mut img, ph + 48, &4u64.to_le_bytes());
        }
        put(&mut img, 0x1000, payload);
        img
    }

    /// A minimal bzImage: one setup sector and `payload` as the protected-mode kernel.
    pub(crate) fn tiny_bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1; // setup_sects
        put(&mut img, 0x1fe, &BOOT_FLAG_MAGIC.to_le_bytes());
        put(&mut img, 0x202, &HDRS_MAGIC.to_le_bytes());
        put(&mut img, 0x206, &0x020fu16.to_le_bytes()); // protocol 2.15
        img[0x211] = 1; // loadflags: LOADED_HIGH
        put(&mut img, 0x214, &0x10_0000u32.to_le_bytes()); // code32_start
        put(&mut img, 0x22c, &0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        put(&mut img, 0x230, &0x20_0000u32.to_le_bytes()); // kernel_alignment
        img[0x234] = 1; // relocatable
        put(&mut img, 0x236, &XLF_KERNEL_64.to_le_bytes());
        put(&mut img, 0x238, &2047u32.to_le_bytes()); // cmdline_size
        put(&mut img, 0x258, &0x100_0000u64.to_le_bytes()); // pref_address
        put(&mut img, 0x260, &0x40_0000u32.to_le_bytes()); // init_size
        img.extend_from_slice(payload);
        img
    }

    fn cfg(cmdline: &str, mem_size: u64) -> BootConfig<'_> {
        BootConfig {
            cmdline,
            nr_vcpus: 2,
            mem_size,
            pci: PciInfo::default(),
        }
    }

    #[test]
    fn e820_256m() {
        let map = e820_map(256 * MIB, &PciInfo::default());
        let expect = [
            (0, 0xA_0000, E820Type::Ram),
            (0xE_0000, 0x2_0000, E820Type::Reserved),
            (0x10_0000, 256 * MIB - 0x10_0000, E820Type::Ram),
            (PCI_ECAM_START, PCI_ECAM_SIZE, E820Type::Reserved),
            (0xFEC0_0000, 0x1000, E820Type::Reserved),
            (0xFEE0_0000, 0x1000, E820Type::Reserved),
        ];
        let got: Vec<_> = map.iter().map(|e| (e.addr, e.size, e.kind)).collect();
        assert_eq!(got, expect);
    }

    #[test]
    fn e820_5g_has_high_ram_and_no_overlaps() {
        let map = e820_map(5 * GIB, &PciInfo::default());
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        // All RAM except the 640K-1M legacy hole.
        assert_eq!(ram, 5 * GIB - (0x10_0000 - 0xA_0000));
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (4 * GIB, 2 * GIB, E820Type::Ram)
        );
        for pair in map.windows(2) {
            assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{pair:?}");
        }
        // No RAM inside the MMIO hole.
        assert!(map.iter().all(|e| e.kind != E820Type::Ram
            || e.addr + e.size <= crate::layout::MMIO_HOLE_START
            || e.addr >= MMIO_HOLE_END));
    }

    #[test]
    fn loads_pvh_elf() {
        let mem = guest_mem(64 * MIB);
        let payload = [0xf4u8; 32]; // hlt
        let mut kernel =
            TempFile::with_bytes("pvh", &tiny_elf(0x20_0000, &payload, Some(0x20_0010)));
        let mut initrd = TempFile::with_bytes("initrd", &[0x5a; 5000]);
        let c = cfg("console=ttyS0 panic=-1", 64 * MIB);
        let boot = load_kernel(&mem, &mut kernel.file, Some(&mut initrd.file), &c).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Pvh);
        assert_eq!(boot.entry, GuestAddress(0x20_0010));
        assert_eq!(boot.params, GuestAddress(START_INFO_ADDR));

        // Kernel bytes are in place.
        let mut got = [0u8; 32];
        mem.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(got, payload);

        // start_info.
        let si: hvm_start_info = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        assert_eq!(si.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(si.version, 1);
        assert_eq!(si.cmdline_paddr, CMDLINE_ADDR);
        assert_eq!(si.rsdp_paddr, ACPI_START);
        assert_eq!(si.memmap_paddr, PVH_MEMMAP_ADDR);
        let map = e820_map(64 * MIB, &PciInfo::default());
        assert_eq!(si.memmap_entries as usize, map.len());
        for (i, e) in map.iter().enumerate() {
            let m: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64))
                .unwrap();
            assert_eq!((m.addr, m.size, m.type_), (e.addr, e.size, e.kind as u32));
        }

        // Command line, NUL terminated.
        let mut cl = [0u8; 24];
        mem.read_slice(&mut cl, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cl, b"console=ttyS0 panic=-1\0\0");

        // initrd: one module, page aligned at the top of RAM.
        assert_eq!(si.nr_modules, 1);
        assert_eq!(si.modlist_paddr, PVH_MODLIST_ADDR);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_ADDR)).unwrap();
        assert_eq!(module.size, 5000);
        assert_eq!(module.paddr, (64 * MIB - 5000) & !0xfff);
        let mut first = [0u8; 4];
        mem.read_slice(&mut first, GuestAddress(module.paddr))
            .unwrap();
        assert_eq!(first, [0x5a; 4]);

        // RSDP is where start_info says.
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(si.rsdp_paddr))
            .unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn elf_without_pvh_note_is_rejected() {
        let mem = guest_mem(32 * MIB);
        let mut kernel = TempFile::with_bytes("nopvh", &tiny_elf(0x20_0000, &[0x90; 16], None));
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(matches!(err, Error::ElfWithoutPvh), "{err}");
        assert!(err.to_string().contains("PVH"));
    }

    #[test]
    fn elf_segment_below_1m_is_rejected() {
        let mem = guest_mem(32 * MIB);
        let mut kernel = TempFile::with_bytes("low", &tiny_elf(0x8000, &[0x90; 16], Some(0x8000)));
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(
            matches!(err, Error::ElfSegment { addr: 0x8000, .. }),
            "{err}"
        );
    }

    #[test]
    fn elf_segment_beyond_ram_is_rejected() {
        let mem = guest_mem(32 * MIB);
        let mut kernel = TempFile::with_bytes(
            "high",
            &tiny_elf(32 * MIB - 0x80, &[0x90; 16], Some(0x10_0000)),
        );
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(matches!(err, Error::ElfSegment { .. }), "{err}");
    }

    #[test]
    fn pvh_entry_outside_ram_is_rejected() {
        let mem = guest_mem(32 * MIB);
        let mut kernel =
            TempFile::with_bytes("entry", &tiny_elf(0x20_0000, &[0; 16], Some(0x7000)));
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(matches!(err, Error::InvalidEntry(0x7000)), "{err}");
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let mem = guest_mem(32 * MIB);
        let mut kernel = TempFile::with_bytes("garbage", &[0xab; 4096]);
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(matches!(err, Error::NotAKernel), "{err}");
        let mut short = TempFile::with_bytes("short", b"MZ");
        let err = load_kernel(&mem, &mut short.file, None, &cfg("", 32 * MIB)).unwrap_err();
        assert!(matches!(err, Error::NotAKernel), "{err}");
    }

    #[test]
    fn bzimage_header_checks() {
        let good = tiny_bzimage(&[0; 16]);
        assert!(check_bzimage_header(&good[..0x268]).is_ok());
        let mut old = good.clone();
        put(&mut old, 0x206, &0x0208u16.to_le_bytes());
        assert!(matches!(
            check_bzimage_header(&old),
            Err(Error::BzImageNot64Bit { version: 0x208, .. })
        ));
        let mut no64 = good.clone();
        put(&mut no64, 0x236, &0u16.to_le_bytes());
        assert!(matches!(
            check_bzimage_header(&no64),
            Err(Error::BzImageNot64Bit { xloadflags: 0, .. })
        ));
        let mut nomagic = good;
        put(&mut nomagic, 0x202, b"HdrX");
        assert!(matches!(
            check_bzimage_header(&nomagic),
            Err(Error::NotAKernel)
        ));
    }

    #[test]
    fn loads_bzimage_with_zero_page() {
        let mem = guest_mem(128 * MIB);
        let payload: Vec<u8> = (0..64u8).collect();
        let mut kernel = TempFile::with_bytes("bz", &tiny_bzimage(&payload));
        let mut initrd = TempFile::with_bytes("bzinitrd", &[7u8; 0x3000]);
        let c = cfg("root=/dev/vda", 128 * MIB);
        let boot = load_kernel(&mem, &mut kernel.file, Some(&mut initrd.file), &c).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Linux64);
        assert_eq!(boot.entry, GuestAddress(0x10_0200));
        let mut got = vec![0u8; payload.len()];
        mem.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(got, payload);

        let zp: boot_params = mem.read_obj(GuestAddress(START_INFO_ADDR)).unwrap();
        let hdr = zp.hdr;
        assert_eq!({ hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ hdr.header }, HDRS_MAGIC);
        assert_eq!(hdr.type_of_loader, LOADER_TYPE_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ hdr.cmdline_size }, "root=/dev/vda".len() as u32);
        assert_eq!({ hdr.ramdisk_size }, 0x3000);
        assert_eq!({ hdr.ramdisk_image }, (128 * MIB - 0x3000) as u32);
        assert_eq!({ zp.acpi_rsdp_addr }, ACPI_START);
        let map = e820_map(128 * MIB, &PciInfo::default());
        assert_eq!(zp.e820_entries as usize, map.len());
        for (slot, e) in zp.e820_table.iter().zip(&map) {
            assert_eq!(
                ({ slot.addr }, { slot.size }, { slot.r#type }),
                (e.addr, e.size, e.kind as u32)
            );
        }
    }

    #[test]
    fn bzimage_cmdline_limit_is_enforced() {
        let mem = guest_mem(64 * MIB);
        let mut kernel = TempFile::with_bytes("bzlong", &tiny_bzimage(&[0; 16]));
        let long = "x".repeat(2048);
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg(&long, 64 * MIB)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::CmdlineTooLong {
                    len: 2049,
                    max: 2048
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn cmdline_checks() {
        assert_eq!(cmdline_bytes("ab", 3).unwrap(), b"ab\0");
        assert!(matches!(
            cmdline_bytes("abc", 3),
            Err(Error::CmdlineTooLong { len: 4, max: 3 })
        ));
        assert!(matches!(cmdline_bytes("a\0b", 10), Err(Error::CmdlineNul)));
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            initrd_address(0x1800, 0x20_0000, 0x400_0000).unwrap(),
            0x3ff_e000
        );
        // Exactly fits above the kernel.
        assert_eq!(
            initrd_address(0x1000, 0x3ff_f000, 0x400_0000).unwrap(),
            0x3ff_f000
        );
        assert!(matches!(
            initrd_address(0x2000, 0x3ff_f001, 0x400_0000),
            Err(Error::InitrdTooLarge { .. })
        ));
        assert!(initrd_address(u64::MAX, 0, 0x400_0000).is_err());
    }

    #[test]
    fn initrd_too_large_for_ram() {
        let mem = guest_mem(16 * MIB);
        let mut kernel = TempFile::with_bytes("k", &tiny_elf(0x10_0000, &[0; 16], Some(0x10_0000)));
        let mut initrd = TempFile::with_bytes("big", &vec![1u8; 16 * MIB as usize]);
        let err = load_kernel(
            &mem,
            &mut kernel.file,
            Some(&mut initrd.file),
            &cfg("", 16 * MIB),
        )
        .unwrap_err();
        assert!(matches!(err, Error::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn rejects_bad_machine_config() {
        let mem = guest_mem(16 * MIB);
        let mut kernel =
            TempFile::with_bytes("k2", &tiny_elf(0x10_0000, &[0; 16], Some(0x10_0000)));
        let err = load_kernel(&mem, &mut kernel.file, None, &cfg("", 8 * MIB)).unwrap_err();
        assert!(matches!(err, Error::MemoryTooSmall { .. }), "{err}");
        let mut c = cfg("", 16 * MIB);
        c.nr_vcpus = 0;
        let err = load_kernel(&mem, &mut kernel.file, None, &c).unwrap_err();
        assert!(matches!(err, Error::InvalidVcpuCount(0)), "{err}");
    }
}
