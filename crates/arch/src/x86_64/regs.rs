//! vCPU boot state: general and special registers, GDT, identity page tables, FPU, MSRs, LAPIC.
//!
//! The builders here are plain functions over values and guest memory so they can be tested
//! without KVM; [`setup_vcpu`] applies them to a vCPU.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::gdt::{boot_gdt, kvm_segment_from_gdt, CODE_INDEX, DATA_INDEX, GDT_ENTRIES, TSS_INDEX};
use super::layout::{
    BOOT_STACK_POINTER, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR,
};
use super::{kvm_err, BootProtocol, BootSetup, Error};

/// The GDTR limit of the boot GDT (its size in bytes, minus one).
// The assert keeps the byte size within 16 bits, so the cast is lossless.
#[allow(clippy::cast_possible_truncation)]
const GDT_LIMIT: u16 = {
    assert!(GDT_ENTRIES * 8 <= 1 << 16);
    (GDT_ENTRIES * 8 - 1) as u16
};

/// CR0: protected mode enable.
pub const CR0_PE: u64 = 1 << 0;

/// CR0: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always set.
pub const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page table entry: present.
const PTE_PRESENT: u64 = 1 << 0;
/// Page table entry: writable.
const PTE_WRITABLE: u64 = 1 << 1;
/// Page directory entry: 2 MiB page.
const PDE_HUGE: u64 = 1 << 7;

/// MSR indices set at boot.
pub mod msr {
    /// Time stamp counter.
    pub const TSC: u32 = 0x10;
    /// SYSENTER code segment.
    pub const SYSENTER_CS: u32 = 0x174;
    /// SYSENTER stack pointer.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// SYSENTER entry point.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// Miscellaneous features enable.
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// SYSCALL segments.
    pub const STAR: u32 = 0xc000_0081;
    /// 64-bit SYSCALL entry.
    pub const LSTAR: u32 = 0xc000_0082;
    /// Compatibility-mode SYSCALL entry.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL RFLAGS mask.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// SWAPGS shadow base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// MISC_ENABLE: fast string operations.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default memory type write-back (6).
pub const MTRR_DEF_TYPE_WB_ENABLED: u64 = (1 << 11) | 6;

/// LAPIC register offset of LVT LINT0.
pub const APIC_LVT0: usize = 0x350;
/// LAPIC register offset of LVT LINT1.
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery mode ExtINT.
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode NMI.
pub const APIC_MODE_NMI: u32 = 0x4;

fn mem_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |source| Error::GuestMemory { what, source }
}

/// Writes the boot GDT (64-bit code segment when `long_mode`) and an empty IDT.
pub fn write_gdt<M: GuestMemoryBackend>(mem: &M, long_mode: bool) -> Result<(), Error> {
    let gdt = boot_gdt(long_mode);
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(mem_err("the GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(mem_err("the IDT"))
}

/// Writes identity page tables mapping the first 4 GiB with 2 MiB pages.
pub fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    let table = PTE_PRESENT | PTE_WRITABLE;
    mem.write_obj(PDPT_ADDR | table, GuestAddress(PML4_ADDR))
        .map_err(mem_err("the PML4"))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | table, GuestAddress(PDPT_ADDR + pd * 8))
            .map_err(mem_err("the PDPT"))?;
        let mut entries = [0u8; 4096];
        for (i, slot) in entries.chunks_exact_mut(8).enumerate() {
            let page = ((pd * 512 + i as u64) << 21) | table | PDE_HUGE;
            slot.copy_from_slice(&page.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(pd_addr))
            .map_err(mem_err("a page directory"))?;
    }
    Ok(())
}

/// General registers of the boot vCPU.
pub fn boot_regs(boot: &BootSetup) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: boot.entry.0,
        ..Default::default()
    };
    match boot.protocol {
        // PVH: EBX holds the physical address of hvm_start_info.
        BootProtocol::Pvh => regs.rbx = boot.params.0,
        // Linux 64-bit boot protocol: RSI holds the zero page.
        BootProtocol::Linux64 => {
            regs.rsi = boot.params.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
        // Firmware: the vCPU keeps KVM's reset state (setup_vcpu does not call this).
        BootProtocol::Firmware => {}
    }
    regs
}

/// Special registers of the boot vCPU, starting from KVM's current `sregs`.
///
/// PVH: flat 32-bit protected mode, paging off. Linux64: flat long mode with the identity page
/// tables from [`write_page_tables`].
pub fn boot_sregs(protocol: BootProtocol, mut sregs: kvm_sregs) -> kvm_sregs {
    let long_mode = protocol == BootProtocol::Linux64;
    let gdt = boot_gdt(long_mode);
    let code = kvm_segment_from_gdt(gdt[usize::from(CODE_INDEX)], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[usize::from(DATA_INDEX)], DATA_INDEX);
    let mut tss = kvm_segment_from_gdt(gdt[usize::from(TSS_INDEX)], TSS_INDEX);
    // The PVH ABI asks for a busy 32-bit TSS; the same type encodes a busy 64-bit TSS.
    tss.type_ = 0xb;

    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = GDT_LIMIT;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;

    if long_mode {
        sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        sregs.cr3 = PML4_ADDR;
        sregs.cr4 = CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
    } else {
        sregs.cr0 = CR0_PE | CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
    }
    sregs
}

/// FPU state at reset: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs every vCPU starts with.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry {
        index,
        reserved: 0,
        data,
    };
    vec![
        entry(msr::SYSENTER_CS, 0),
        entry(msr::SYSENTER_ESP, 0),
        entry(msr::SYSENTER_EIP, 0),
        entry(msr::STAR, 0),
        entry(msr::CSTAR, 0),
        entry(msr::KERNEL_GS_BASE, 0),
        entry(msr::SYSCALL_MASK, 0),
        entry(msr::LSTAR, 0),
        entry(msr::TSC, 0),
        entry(msr::MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(msr::MTRR_DEF_TYPE, MTRR_DEF_TYPE_WB_ENABLED),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    for (i, b) in bytes.iter_mut().enumerate() {
        // c_char is i8 on x86_64: reinterpret the bits.
        *b = lapic.regs.get(offset + i).copied().unwrap_or(0) as u8;
    }
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        if let Some(slot) = lapic.regs.get_mut(offset + i) {
            *slot = *b as std::os::raw::c_char;
        }
    }
}

/// Sets the delivery mode of an LVT register, keeping its other bits.
fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, like a PC BIOS does.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_delivery_mode(lvt1, APIC_MODE_NMI));
}

/// Reads an LVT register's delivery mode (for tests and diagnostics).
pub fn lvt_delivery_mode(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    (lapic_reg(lapic, offset) >> 8) & 0x7
}

fn setup_msrs(vcpu: &VcpuFd) -> Result<(), Error> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|e| Error::MsrList(format!("{e:?}")))?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if set < entries.len() {
        let index = entries.get(set).map_or(0, |e| e.index);
        return Err(Error::MsrRejected { index });
    }
    Ok(())
}

/// Sets up vCPU `id` for `boot`.
///
/// Every vCPU gets its FPU, boot MSRs and LAPIC LINT0/LINT1 modes (the in-kernel irqchip must
/// exist). vCPU 0 also gets its general and special registers, and the GDT (plus, for Linux64,
/// the identity page tables) is written to guest memory. Other vCPUs wait for INIT/SIPI.
pub fn setup_vcpu<M: GuestMemoryBackend>(
    _platform: &super::Platform,
    vcpu: &VcpuFd,
    id: u8,
    boot: &BootSetup,
    mem: &M,
) -> Result<(), Error> {
    setup_msrs(vcpu)?;
    vcpu.set_fpu(&boot_fpu()).map_err(kvm_err("KVM_SET_FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;

    // Firmware starts vCPU 0 from KVM's reset state: real mode at the reset vector.
    if id == 0 && boot.protocol != BootProtocol::Firmware {
        let long_mode = boot.protocol == BootProtocol::Linux64;
        write_gdt(mem, long_mode)?;
        if long_mode {
            write_page_tables(mem)?;
        }
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        vcpu.set_sregs(&boot_sregs(boot.protocol, sregs))
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&boot_regs(boot))
            .map_err(kvm_err("KVM_SET_REGS"))?;
    }
    Ok(())
}

#[cfg(test)]
// Test inputs are small constants and indices; their casts cannot truncate.
#[allow(clippy::cast_possible_truncation)]
pub(crate) mod tests {
    use super::*;
    use crate::boot::tests::guest_mem;
    use crate::layout::START_INFO_ADDR;
    use kvm_ioctls::Kvm;

    fn setup(protocol: BootProtocol) -> BootSetup {
        BootSetup {
            entry: GuestAddress(0x100_0000),
            protocol,
            params: GuestAddress(START_INFO_ADDR),
        }
    }

    /// Walks the identity page tables for `addr` and returns the mapped physical address.
    fn translate<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Option<u64> {
        let pml4e: u64 = mem
            .read_obj(GuestAddress(PML4_ADDR + 8 * ((addr >> 39) & 0x1ff)))
            .ok()?;
        if pml4e & PTE_PRESENT == 0 {
            return None;
        }
        let pdpte: u64 = mem
            .read_obj(GuestAddress((pml4e & !0xfff) + 8 * ((addr >> 30) & 0x1ff)))
            .ok()?;
        if pdpte & PTE_PRESENT == 0 {
            return None;
        }
        let pde: u64 = mem
            .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((addr >> 21) & 0x1ff)))
            .ok()?;
        if pde & PTE_PRESENT == 0 || pde & PDE_HUGE == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (addr & 0x1f_ffff))
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = guest_mem(64 << 20);
        write_page_tables(&mem).unwrap();
        for addr in [
            0,
            0x1234,
            0x10_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xc000_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, addr), Some(addr), "{addr:#x}");
        }
        // Nothing above 4 GiB.
        assert_eq!(translate(&mem, 0x1_0000_0000), None);
        // Every PDE is a writable 2 MiB page.
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + 8 * 5)).unwrap();
        assert_eq!(pde, (5 << 21) | 0x83);
    }

    #[test]
    fn gdt_in_memory_matches_segments() {
        let mem = guest_mem(64 << 20);
        for (long, protocol) in [(true, BootProtocol::Linux64), (false, BootProtocol::Pvh)] {
            write_gdt(&mem, long).unwrap();
            let sregs = boot_sregs(protocol, kvm_sregs::default());
            let code: u64 = mem
                .read_obj(GuestAddress(GDT_ADDR + u64::from(sregs.cs.selector)))
                .unwrap();
            assert_eq!(kvm_segment_from_gdt(code, CODE_INDEX), sregs.cs);
            let data: u64 = mem
                .read_obj(GuestAddress(GDT_ADDR + u64::from(sregs.ds.selector)))
                .unwrap();
            assert_eq!(kvm_segment_from_gdt(data, DATA_INDEX), sregs.ds);
            assert_eq!(sregs.cs.l, u8::from(long));
            assert_eq!(sregs.cs.db, u8::from(!long));
        }
        let null: u64 = mem.read_obj(GuestAddress(GDT_ADDR)).unwrap();
        assert_eq!(null, 0);
    }

    #[test]
    fn pvh_registers_follow_the_abi() {
        let boot = setup(BootProtocol::Pvh);
        let regs = boot_regs(&boot);
        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags),
            (0x100_0000, START_INFO_ADDR, 2)
        );
        let sregs = boot_sregs(BootProtocol::Pvh, kvm_sregs::default());
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!(
            (sregs.cs.base, sregs.cs.limit, sregs.cs.type_),
            (0, 0xffff_ffff, 0xb)
        );
        assert_eq!(
            (sregs.ss.base, sregs.ss.limit, sregs.ss.db),
            (0, 0xffff_ffff, 1)
        );
        assert_eq!((sregs.tr.type_, sregs.tr.present, sregs.tr.s), (0xb, 1, 0));
    }

    #[test]
    fn linux64_registers_enter_long_mode() {
        let boot = setup(BootProtocol::Linux64);
        let regs = boot_regs(&boot);
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100_0000, START_INFO_ADDR, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rbx, 0);
        let sregs = boot_sregs(BootProtocol::Linux64, kvm_sregs::default());
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_ne!(sregs.cr4 & CR4_PAE, 0);
        assert_eq!(sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        assert_eq!(sregs.gdt.base, GDT_ADDR);
    }

    #[test]
    fn lint_modes() {
        let mut lapic = kvm_lapic_state::default();
        // Masked LINT0 with a vector, as after reset.
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0020);
        set_lint_modes(&mut lapic);
        assert_eq!(lvt_delivery_mode(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(lvt_delivery_mode(&lapic, APIC_LVT1), APIC_MODE_NMI);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0720);
    }

    #[test]
    fn msr_list() {
        let msrs = boot_msr_entries();
        let get = |i| msrs.iter().find(|e| e.index == i).map(|e| e.data);
        assert_eq!(get(msr::MISC_ENABLE), Some(1));
        assert_eq!(get(msr::MTRR_DEF_TYPE), Some(0x806));
        assert_eq!(get(msr::LSTAR), Some(0));
        assert_eq!(get(msr::TSC), Some(0));
    }

    /// Creates a VM with an irqchip and `n` vCPUs, or `None` without /dev/kvm.
    pub(crate) fn kvm_vm(n: u8) -> Option<(Kvm, kvm_ioctls::VmFd, Vec<VcpuFd>)> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("SKIP: /dev/kvm not available");
            return None;
        }
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpus = (0..n)
            .map(|i| vm.create_vcpu(u64::from(i)).unwrap())
            .collect();
        Some((kvm, vm, vcpus))
    }

    fn check_common_state(vcpu: &VcpuFd) {
        // Read the FPU state back through XSAVE: some KVM builds (kvm_pvm) report MXCSR as 0
        // from KVM_GET_FPU although the value is set. FCW is bytes 0-1, MXCSR bytes 24-27.
        let xsave = vcpu.get_xsave().unwrap();
        assert_eq!((xsave.region[0] & 0xffff, xsave.region[6]), (0x37f, 0x1f80));
        let lapic = vcpu.get_lapic().unwrap();
        assert_eq!(lvt_delivery_mode(&lapic, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(lvt_delivery_mode(&lapic, APIC_LVT1), APIC_MODE_NMI);
        let entries = boot_msr_entries();
        let mut msrs = Msrs::from_entries(&entries).unwrap();
        let n = vcpu.get_msrs(&mut msrs).unwrap();
        assert_eq!(n, entries.len());
        for e in msrs.as_slice() {
            match e.index {
                msr::MISC_ENABLE => assert_ne!(e.data & MISC_ENABLE_FAST_STRING, 0),
                msr::MTRR_DEF_TYPE => assert_eq!(e.data, MTRR_DEF_TYPE_WB_ENABLED),
                // The TSC has moved on since it was zeroed; only check the rest.
                msr::TSC => {}
                _ => assert_eq!(e.data, 0, "MSR {:#x}", e.index),
            }
        }
    }

    #[test]
    fn kvm_setup_vcpu_pvh() {
        let Some((_kvm, _vm, vcpus)) = kvm_vm(2) else {
            return;
        };
        let mem = guest_mem(64 << 20);
        let boot = setup(BootProtocol::Pvh);
        for (id, vcpu) in vcpus.iter().enumerate() {
            setup_vcpu(&crate::Platform, vcpu, id as u8, &boot, &mem).unwrap();
            check_common_state(vcpu);
        }
        let regs = vcpus[0].get_regs().unwrap();
        assert_eq!(
            (regs.rip, regs.rbx, regs.rflags),
            (0x100_0000, START_INFO_ADDR, 2)
        );
        let sregs = vcpus[0].get_sregs().unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE);
        assert_eq!(sregs.efer & EFER_LMA, 0);
        assert_eq!((sregs.cs.selector, sregs.cs.db, sregs.cs.l), (0x8, 1, 0));
        assert_eq!((sregs.ds.selector, sregs.ss.selector), (0x10, 0x10));
        // The AP keeps its reset state.
        let ap = vcpus[1].get_regs().unwrap();
        assert_ne!(ap.rip, 0x100_0000);
    }

    #[test]
    fn kvm_setup_vcpu_linux64() {
        let Some((_kvm, _vm, vcpus)) = kvm_vm(1) else {
            return;
        };
        let mem = guest_mem(64 << 20);
        let boot = setup(BootProtocol::Linux64);
        setup_vcpu(&crate::Platform, &vcpus[0], 0, &boot, &mem).unwrap();
        check_common_state(&vcpus[0]);
        let regs = vcpus[0].get_regs().unwrap();
        assert_eq!((regs.rip, regs.rsi), (0x100_0000, START_INFO_ADDR));
        let sregs = vcpus[0].get_sregs().unwrap();
        assert_eq!(sregs.cr3, PML4_ADDR);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & CR0_PG, 0);
        assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 0x8));
        assert_eq!(translate(&mem, 0x7654_3210), Some(0x7654_3210));
    }
}
