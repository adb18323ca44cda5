//! Booting an arm64 Linux `Image`: where the kernel, the initrd and the device tree go in
//! guest RAM, and the registers the boot vCPU starts with (the arm64 boot protocol: MMU off,
//! EL1h with interrupts masked, X0 = the device tree's address, X1-X3 = 0).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use kvm_bindings::{
    kvm_vcpu_init, KVM_ARM_VCPU_POWER_OFF, KVM_ARM_VCPU_PSCI_0_2, KVM_REG_ARM64, KVM_REG_ARM_CORE,
    KVM_REG_SIZE_U64,
};
use kvm_ioctls::VcpuFd;
use linux_loader::loader::pe::PE;
use linux_loader::loader::KernelLoader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::fdt::{create_fdt, InitrdRange};
use super::layout::{FDT_MAX_SIZE, RAM_START};
use super::{kvm_err, BootConfig, BootSetup, Error, Platform};

/// The arm64 `Image` header's fields this loader reads (Documentation/arch/arm64/booting.rst).
const IMAGE_HEADER_LEN: usize = 64;
const IMAGE_MAGIC_OFFSET: usize = 56;
const IMAGE_MAGIC: &[u8; 4] = b"ARM\x64";

/// Bytes of RAM the kernel occupies from where it is loaded: the header's `image_size`
/// (which includes its BSS), or the file's size for old images that leave it 0.
fn kernel_footprint(kernel: &mut File) -> Result<u64, Error> {
    let mut header = [0u8; IMAGE_HEADER_LEN];
    let bad = |what: &str| Error::Kernel(format!("not an arm64 Image: {what}"));
    kernel
        .seek(SeekFrom::Start(0))
        .and_then(|_| kernel.read_exact(&mut header))
        .map_err(|e| bad(&format!("cannot read its header ({e})")))?;
    if &header[IMAGE_MAGIC_OFFSET..IMAGE_MAGIC_OFFSET + 4] != IMAGE_MAGIC {
        return Err(bad(
            "no ARM\\x64 magic at byte 56 (a compressed vmlinuz must be gunzipped)",
        ));
    }
    let field = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (text_offset, image_size) = (field(8), field(16));
    let file_size = kernel
        .seek(SeekFrom::End(0))
        .map_err(|e| bad(&format!("cannot size it ({e})")))?;
    Ok(text_offset.saturating_add(image_size.max(file_size)))
}

/// The file's length.
fn file_len(file: &mut File, what: &str) -> Result<u64, Error> {
    file.seek(SeekFrom::End(0))
        .map_err(|e| Error::Kernel(format!("cannot size the {what}: {e}")))
}

/// Loads `kernel` (an uncompressed arm64 `Image`) at the start of RAM, `initrd` just below the
/// device tree at the top of RAM, and the device tree describing `cfg`.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    kernel: &mut File,
    initrd: Option<&mut File>,
    cfg: &BootConfig,
) -> Result<BootSetup, Error> {
    if cfg.cmdline.len() >= super::layout::CMDLINE_MAX {
        return Err(Error::Kernel(format!(
            "the command line has {} bytes; arm64 allows {}",
            cfg.cmdline.len(),
            super::layout::CMDLINE_MAX - 1
        )));
    }
    let ram_end = RAM_START
        .checked_add(cfg.mem_size)
        .ok_or_else(|| Error::Kernel("guest memory size overflows".into()))?;
    let too_small = |what: &str| {
        Error::Kernel(format!(
            "{} MiB of guest memory cannot hold the kernel, {what} and the device tree",
            cfg.mem_size >> 20
        ))
    };
    let footprint = kernel_footprint(kernel)?;
    // The device tree at the top of RAM, 2 MiB aligned (the boot protocol wants 8 bytes).
    let fdt_addr = (ram_end.saturating_sub(FDT_MAX_SIZE)) & !(FDT_MAX_SIZE - 1);
    let kernel_end = RAM_START.saturating_add(footprint);
    if fdt_addr < kernel_end {
        return Err(too_small("nothing else"));
    }

    let loaded = PE::load(mem, Some(GuestAddress(RAM_START)), kernel, None)
        .map_err(|e| Error::Kernel(format!("cannot load the arm64 Image: {e}")))?;

    let initrd_range = match initrd {
        None => None,
        Some(file) => {
            let size = file_len(file, "initrd")?;
            let start = fdt_addr.checked_sub(size).map(|a| a & !0xfff);
            let start = match start {
                Some(s) if s >= kernel_end => s,
                _ => return Err(too_small(&format!("a {size}-byte initrd"))),
            };
            let len = usize::try_from(size).map_err(|_| too_small("the initrd"))?;
            file.seek(SeekFrom::Start(0))
                .map_err(|e| Error::Kernel(format!("cannot read the initrd: {e}")))?;
            mem.read_exact_volatile_from(GuestAddress(start), file, len)
                .map_err(|e| Error::Kernel(format!("cannot load the initrd: {e}")))?;
            Some(InitrdRange { start, size })
        }
    };

    let blob = create_fdt(cfg, initrd_range)?;
    if u64::try_from(blob.len()).unwrap_or(u64::MAX) > FDT_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "the device tree takes {} bytes, more than 2 MiB",
            blob.len()
        )));
    }
    mem.write_slice(&blob, GuestAddress(fdt_addr))
        .map_err(|e| Error::Fdt(format!("cannot write the device tree: {e}")))?;
    Ok(BootSetup {
        entry: loaded.kernel_load,
        fdt: GuestAddress(fdt_addr),
    })
}

/// The `KVM_{GET,SET}_ONE_REG` id of the 64-bit core register at byte `offset` of
/// `struct kvm_regs`.
pub(super) const fn core_reg(offset: u64) -> u64 {
    KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE as u64 | (offset / 4)
}

/// X0 (`regs.regs[0]`).
const REG_X0: u64 = core_reg(0);
/// PC (`regs.pc`, after the 31 general registers and SP).
pub(super) const REG_PC: u64 = core_reg(32 * 8);
/// PSTATE (`regs.pstate`).
const REG_PSTATE: u64 = core_reg(33 * 8);
/// EL1 with its own stack pointer, debug, SError, IRQ and FIQ masked.
const PSTATE_EL1H_MASKED: u64 = 0x3c5;

/// `KVM_ARM_VCPU_INIT` for vCPU `id`: PSCI 0.2 for all; every vCPU but the first starts
/// powered off and waits for the guest's PSCI `CPU_ON`.
pub fn vcpu_init(target: &kvm_vcpu_init, id: u8) -> kvm_vcpu_init {
    let mut init = *target;
    init.features[0] |= 1 << KVM_ARM_VCPU_PSCI_0_2;
    if id > 0 {
        init.features[0] |= 1 << KVM_ARM_VCPU_POWER_OFF;
    }
    init
}

/// Initialises vCPU `id`; the first one starts at the kernel's entry with X0 = the device
/// tree (the others are started by the guest through PSCI).
pub fn setup_vcpu<M: GuestMemoryBackend>(
    platform: &Platform,
    vcpu: &VcpuFd,
    id: u8,
    boot: &BootSetup,
    _mem: &M,
) -> Result<(), Error> {
    super::prepare_vcpu(platform, vcpu, id)?;
    if id == 0 {
        let set = |reg: u64, value: u64| {
            vcpu.set_one_reg(reg, &value.to_le_bytes())
                .map(drop)
                .map_err(kvm_err("KVM_SET_ONE_REG"))
        };
        set(REG_PSTATE, PSTATE_EL1H_MASKED)?;
        set(REG_X0, boot.fdt.0)?;
        set(REG_PC, boot.entry.0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_register_ids_match_the_kernel_abi() {
        // Values from arch/arm64/include/uapi/asm/kvm.h: KVM_REG_ARM64 | U64 | CORE | off/4.
        assert_eq!(REG_X0, 0x6030_0000_0010_0000);
        assert_eq!(REG_PC, 0x6030_0000_0010_0040);
        assert_eq!(REG_PSTATE, 0x6030_0000_0010_0042);
    }

    #[test]
    fn secondary_vcpus_start_powered_off_with_psci() {
        let target = kvm_vcpu_init::default();
        let boot = vcpu_init(&target, 0);
        let other = vcpu_init(&target, 1);
        assert_ne!(boot.features[0] & (1 << KVM_ARM_VCPU_PSCI_0_2), 0);
        assert_eq!(boot.features[0] & (1 << KVM_ARM_VCPU_POWER_OFF), 0);
        assert_ne!(other.features[0] & (1 << KVM_ARM_VCPU_POWER_OFF), 0);
    }
}
