//! x86_64 platform: memory layout, VM creation, legacy devices, interrupt routes, boot
//! protocols, vCPU and VM state, CPUID and ACPI.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod exit;
pub mod firmware;
pub mod gdt;
pub mod irq;
pub mod layout;
pub mod legacy;
pub mod regs;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;

pub use acpi::create_acpi_tables;
pub use boot::{e820_map, load_kernel, E820Entry, E820Type};
pub use cpuid::{cpuid_feature_names, setup_cpuid, validate_cpuid_hide};
pub use exit::{handle_arch_exit, instruction_pointer};
pub use firmware::{firmware_fw_cfg, load_firmware, map_firmware, read_firmware, FirmwareRom};
pub use irq::{legacy_irq_routes, msi_route, IRQCHIP_PINS};
pub use legacy::{add_legacy_devices, LegacyContext, LegacyDevices, PlatformState};
pub use regs::setup_vcpu;
pub use vcpu_state::{CpuModel, VcpuSaveContext, VcpuState};
pub use vm::{create_vm, prepare_vcpu, setup_vm, Platform};
pub use vm_state::VmState;

/// The architecture this module builds guests for, as snapshots record it.
pub const ARCH_NAME: &str = "x86_64";

use vm_memory::GuestAddress;

/// Errors from setting up the guest platform.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory is smaller than the platform needs.
    #[error("guest memory of {size} bytes is too small: at least {min} bytes are needed")]
    MemoryTooSmall {
        /// Requested size.
        size: u64,
        /// Minimum size.
        min: u64,
    },
    /// The number of vCPUs is out of range.
    #[error("invalid vCPU count {0}: must be between 1 and 254")]
    InvalidVcpuCount(u8),
    /// A vCPU index is not below the vCPU count.
    #[error("vCPU index {id} is out of range for {count} vCPUs")]
    InvalidVcpuId {
        /// vCPU index.
        id: u8,
        /// vCPU count.
        count: u8,
    },
    /// Reading the kernel image failed.
    #[error("cannot read the kernel image: {0}")]
    KernelRead(#[source] std::io::Error),
    /// The ELF kernel has no PVH entry point.
    #[error(
        "the ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build it with PVH \
         support (Linux: CONFIG_PVH=y) or boot a bzImage instead"
    )]
    ElfWithoutPvh,
    /// An ELF program header places a segment outside usable guest RAM.
    #[error(
        "ELF segment at {addr:#x} (size {size:#x}) is outside guest RAM at or above 1 MiB \
         below the MMIO hole"
    )]
    ElfSegment {
        /// Physical load address.
        addr: u64,
        /// Size in memory.
        size: u64,
    },
    /// The PVH entry point is not in guest RAM above 1 MiB.
    #[error("the PVH entry point {0:#x} is outside guest RAM at or above 1 MiB")]
    InvalidEntry(u64),
    /// The ELF headers are malformed.
    #[error("malformed ELF kernel: {0}")]
    ElfMalformed(&'static str),
    /// linux-loader failed to load the ELF kernel.
    #[error("cannot load the ELF kernel: {0}")]
    ElfLoad(#[source] linux_loader::loader::Error),
    /// The image is neither an ELF nor a bzImage.
    #[error("not a bootable kernel: neither an ELF file nor a bzImage (no \"HdrS\" magic at offset 0x202)")]
    NotAKernel,
    /// The bzImage cannot be entered in 64-bit mode.
    #[error(
        "the bzImage cannot be booted through the 64-bit boot protocol (protocol version \
         {version:#x}, xloadflags {xloadflags:#x}; need version >= 0x20c with XLF_KERNEL_64)"
    )]
    BzImageNot64Bit {
        /// Boot protocol version.
        version: u16,
        /// Extended load flags.
        xloadflags: u16,
    },
    /// linux-loader failed to load the bzImage.
    #[error("cannot load the bzImage kernel: {0}")]
    BzImageLoad(#[source] linux_loader::loader::Error),
    /// The command line does not fit.
    #[error("kernel command line is {len} bytes, the limit is {max} bytes")]
    CmdlineTooLong {
        /// Length including the terminating NUL.
        len: usize,
        /// Limit including the terminating NUL.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Reading the initrd failed.
    #[error("cannot read the initrd: {0}")]
    InitrdRead(#[source] std::io::Error),
    /// The initrd does not fit in guest RAM.
    #[error(
        "initrd of {size} bytes does not fit in guest RAM between the kernel end {kernel_end:#x} \
         and {limit:#x}; give the guest more memory"
    )]
    InitrdTooLarge {
        /// Initrd size.
        size: u64,
        /// End of the kernel footprint.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// A guest memory access failed.
    #[error("cannot write {what} to guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// The vm-memory error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// linux-loader failed to write the boot parameters.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// The memory map has more entries than the boot protocol can carry.
    #[error("the memory map has {0} entries, more than the boot protocol can carry")]
    TooManyMemoryMapEntries(usize),
    /// Reading the firmware image failed.
    #[error("cannot read the firmware image: {0}")]
    FirmwareRead(#[source] std::io::Error),
    /// The firmware image has a size no ROM has.
    #[error(
        "the firmware image is {0} bytes: a ROM must be 64 KiB to 16 MiB, a whole number of \
         4 KiB pages (SeaBIOS's bios.bin, OVMF.fd)"
    )]
    FirmwareSize(u64),
    /// The firmware ROM could not be mapped.
    #[error("cannot map the firmware ROM: {0}")]
    FirmwareMap(String),
    /// The firmware configuration device could not be filled.
    #[error("cannot build the firmware configuration: {0}")]
    FirmwareConfig(String),
    /// The ACPI tables do not fit their area.
    #[error("ACPI tables need {size} bytes, more than the {available} bytes at 0xE0000")]
    AcpiTooLarge {
        /// Bytes needed.
        size: u64,
        /// Bytes available.
        available: u64,
    },
    /// A KVM ioctl failed.
    #[error("KVM {what} failed: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused one of the boot MSRs.
    #[error("KVM refused to set MSR {index:#x}")]
    MsrRejected {
        /// The MSR index.
        index: u32,
    },
    /// An unknown CPU feature name was given to hide.
    #[error("unknown CPU feature \"{name}\"; known features: {known}")]
    UnknownCpuFeature {
        /// The name given.
        name: String,
        /// Comma-separated known names.
        known: String,
    },
    /// A KVM MSR list could not be built.
    #[error("cannot build the KVM MSR list: {0}")]
    MsrList(String),
    /// The CPUID table could not be built.
    #[error("cannot build the CPUID table: {0}")]
    Cpuid(String),
    /// A host call failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A legacy device does not fit on its bus.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
    /// The serial port could not be built (or restored).
    #[error("serial port: {0}")]
    Serial(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The vCPUs hold more XSAVE state than a snapshot carries.
    #[error(
        "this VM's XSAVE state is {size} bytes; snapshots only carry {supported} so far (AMX \
         or another large XSAVE feature is enabled)"
    )]
    XsaveTooLarge {
        /// Bytes KVM holds per vCPU.
        size: usize,
        /// Bytes a snapshot carries.
        supported: usize,
    },
    /// The snapshot's guest saw CPU features this host cannot give it.
    #[error("this host lacks CPU features the guest uses: {0}")]
    MissingCpuFeatures(String),
    /// KVM refused a saved MSR value.
    #[error("KVM refused MSR {index:#x} = {value:#x}")]
    MsrValueRejected {
        /// The MSR index.
        index: u32,
        /// The saved value.
        value: u64,
    },
    /// Saved VM state that cannot be restored as it is.
    #[error("bad saved VM state: {0}")]
    BadVmState(String),
    /// Something this architecture does not do (yet).
    #[error("{0}")]
    Unsupported(&'static str),
}

/// Maps a KVM error to [`Error::Kvm`] naming the operation.
pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

/// Where the PCI host bridge decodes, as the ACPI MCFG and DSDT `_CRS` describe it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciInfo {
    /// ECAM base address (bus 0).
    pub ecam_base: u64,
    /// ECAM size in bytes.
    pub ecam_size: u64,
    /// 32-bit MMIO window base (BARs).
    pub mmio_base: u64,
    /// 32-bit MMIO window size.
    pub mmio_size: u64,
}

impl Default for PciInfo {
    fn default() -> Self {
        PciInfo {
            ecam_base: layout::PCI_ECAM_START,
            ecam_size: layout::PCI_ECAM_SIZE,
            mmio_base: layout::PCI_MMIO_START,
            mmio_size: layout::PCI_MMIO_SIZE,
        }
    }
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, identity paging, RSI = zero page.
    Linux64,
    /// Firmware (SeaBIOS, OVMF): KVM's reset state, real mode at the reset vector.
    Firmware,
}

/// Result of [`load_kernel`]: where and how to start the boot vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSetup {
    /// Entry point (guest physical).
    pub entry: GuestAddress,
    /// Boot protocol.
    pub protocol: BootProtocol,
    /// Address of `hvm_start_info` (PVH) or the zero page (Linux64).
    pub params: GuestAddress,
}

/// What [`load_kernel`] needs to know about the machine.
#[derive(Clone, Copy, Debug)]
pub struct BootConfig<'a> {
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (MADT entries).
    pub nr_vcpus: u8,
    /// Guest RAM size in bytes (laid out by [`layout::ram_regions`]).
    pub mem_size: u64,
    /// PCI host bridge resources.
    pub pci: PciInfo,
}

/// A constant that must fit 32 bits (an address below 4 GiB, a small count), as a `u32`.
/// Call it in a `const` item so the check happens at compile time.
// The assert rules truncation out.
#[allow(clippy::cast_possible_truncation)]
pub(crate) const fn fits_u32(v: u64) -> u32 {
    assert!(v <= u32::MAX as u64, "constant does not fit 32 bits");
    v as u32
}

/// Checks a vCPU count: 1..=254 (APIC id 255 is the broadcast id).
pub(crate) fn check_vcpu_count(nr_vcpus: u8) -> Result<(), Error> {
    if nr_vcpus == 0 || nr_vcpus == u8::MAX {
        return Err(Error::InvalidVcpuCount(nr_vcpus));
    }
    Ok(())
}

/// Boots tiny guests on real KVM: checks that the entry state each boot protocol promises holds.
#[cfg(test)]
// Test inputs are small constants and indices; their casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
mod boot_smoke_tests {
    use super::*;
    use crate::boot::tests::{guest_mem, tiny_bzimage, tiny_elf, TempFile};
    use crate::layout::{CMDLINE_ADDR, DEBUG_EXIT_PORT, START_INFO_ADDR};
    use crate::regs::tests::kvm_vm;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
    use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress};

    fn map_memory(vm: &VmFd, mem: &GuestMemoryMmap) {
        for (slot, region) in mem.iter().enumerate() {
            let host = region.get_host_address(MemoryRegionAddress(0)).unwrap();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping is valid for `region.len()` bytes and `mem` outlives the VM
            // (callers declare it first, so it is dropped after the VM).
            unsafe { vm.set_user_memory_region(r).unwrap() };
        }
    }

    /// Runs the vCPU until it has written `count` dwords to the debug port.
    fn debug_port_writes(vcpu: &mut VcpuFd, count: usize) -> Vec<u32> {
        let mut values = Vec::new();
        for _ in 0..1000 {
            if values.len() == count {
                return values;
            }
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(DEBUG_EXIT_PORT, data) => {
                    let mut v = [0u8; 4];
                    v[..data.len().min(4)].copy_from_slice(&data[..data.len().min(4)]);
                    values.push(u32::from_le_bytes(v));
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
        panic!("guest did not write {count} values: {values:x?}");
    }

    fn boot_config(cmdline: &str) -> BootConfig<'_> {
        BootConfig {
            cmdline,
            nr_vcpus: 1,
            mem_size: 64 << 20,
            pci: PciInfo::default(),
        }
    }

    #[test]
    fn pvh_entry_state_on_kvm() {
        let mem = guest_mem(64 << 20);
        let Some((kvm, vm, mut vcpus)) = kvm_vm(1) else {
            return;
        };
        map_memory(&vm, &mem);
        #[rustfmt::skip]
        let code = [
            0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
            0x89, 0xd8,             // mov eax, ebx
            0xef,                   // out dx, eax
            0x8b, 0x03,             // mov eax, [ebx]       (start_info magic)
            0xef,                   // out dx, eax
            0x8b, 0x43, 0x18,       // mov eax, [ebx + 24]  (cmdline_paddr)
            0xef,                   // out dx, eax
            0x0f, 0x20, 0xc0,       // mov eax, cr0
            0xef,                   // out dx, eax
            0xeb, 0xfe,             // jmp $
        ];
        let mut kernel =
            TempFile::with_bytes("smoke-pvh", &tiny_elf(0x20_0000, &code, Some(0x20_0000)));
        let boot = load_kernel(&mem, &mut kernel.file, None, &boot_config("hi")).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Pvh);
        setup_cpuid(&kvm, &vcpus[0], 0, 1, &[]).unwrap();
        setup_vcpu(&Platform, &vcpus[0], 0, &boot, &mem).unwrap();
        let values = debug_port_writes(&mut vcpus[0], 4);
        assert_eq!(values[0], START_INFO_ADDR as u32, "EBX");
        assert_eq!(values[1], 0x336e_c578, "hvm_start_info magic");
        assert_eq!(values[2], CMDLINE_ADDR as u32);
        assert_eq!(values[3] & 0x8000_0001, 1, "CR0: PE on, PG off");
    }

    #[test]
    fn linux64_entry_state_on_kvm() {
        let mem = guest_mem(64 << 20);
        let Some((kvm, vm, mut vcpus)) = kvm_vm(1) else {
            return;
        };
        map_memory(&vm, &mem);
        let mut image = vec![0x90u8; 0x200]; // the 32-bit entry, unused
        #[rustfmt::skip]
        image.extend_from_slice(&[
            0x66, 0xba, 0xf4, 0x00,                   // mov dx, 0xf4
            0x8b, 0x86, 0x02, 0x02, 0x00, 0x00,       // mov eax, [rsi + 0x202]  ("HdrS")
            0xef,                                     // out dx, eax
            0x48, 0x89, 0xf0,                         // mov rax, rsi
            0xef,                                     // out dx, eax
            0x8b, 0x04, 0x25, 0x00, 0x00, 0x02, 0x00, // mov eax, [0x20000]      (cmdline)
            0xef,                                     // out dx, eax
            0xb9, 0x80, 0x00, 0x00, 0xc0,             // mov ecx, 0xc0000080     (EFER)
            0x0f, 0x32,                               // rdmsr
            0x66, 0xba, 0xf4, 0x00,                   // mov dx, 0xf4
            0xef,                                     // out dx, eax
            0xeb, 0xfe,                               // jmp $
        ]);
        let mut kernel = TempFile::with_bytes("smoke-bz", &tiny_bzimage(&image));
        let boot = load_kernel(&mem, &mut kernel.file, None, &boot_config("abcd")).unwrap();
        assert_eq!(boot.protocol, BootProtocol::Linux64);
        setup_cpuid(&kvm, &vcpus[0], 0, 1, &[]).unwrap();
        setup_vcpu(&Platform, &vcpus[0], 0, &boot, &mem).unwrap();
        let values = debug_port_writes(&mut vcpus[0], 4);
        assert_eq!(values[0], 0x5372_6448, "zero page header");
        assert_eq!(values[1], START_INFO_ADDR as u32, "RSI");
        assert_eq!(&values[2].to_le_bytes(), b"abcd");
        assert_eq!(values[3] & 0x500, 0x500, "EFER.LME and LMA");
    }
}
