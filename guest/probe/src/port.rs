//! Port I/O, MMIO and a few privileged x86 instructions.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the probe owns the machine.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 16-bit word to an I/O port.
pub fn outw(port: u16, v: u16) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit word to an I/O port.
pub fn outl(port: u16, v: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") v, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads a 32-bit word from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack, preserves_flags))
    }
    v
}

/// Reads the time stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the TSC.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    ((hi as u64) << 32) | lo as u64
}

/// Writes the model-specific register `msr`.
pub fn wrmsr(msr: u32, v: u64) {
    let (lo, hi) = (crate::bits::lo32(v), crate::bits::lo32(v >> 32));
    // SAFETY: callers only write MSRs whose CPUID feature they checked (the TSC deadline).
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") lo, in("edx") hi, options(nomem, nostack))
    }
}

/// Executes `cpuid` for `leaf`/`sub`, returning eax, ebx, ecx, edx.
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads CR3 (the page table root).
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reloads CR3, flushing the TLB.
pub fn flush_tlb() {
    // SAFETY: writing back the current CR3 only flushes non-global TLB entries.
    unsafe { asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack, preserves_flags)) }
}

/// Disables interrupts and halts forever.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: cli; hlt stops this CPU; nothing else depends on it.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Volatile MMIO / guest-RAM access at a physical (identity-mapped) address.
pub mod mmio {
    /// Reads a `T` from physical address `addr`.
    pub fn read<T: Copy>(addr: u64) -> T {
        // SAFETY: all RAM and MMIO used by the probe is identity mapped; callers pass
        // addresses of device registers or of memory the probe allocated.
        unsafe { core::ptr::read_volatile(addr as *const T) }
    }

    /// Writes a `T` to physical address `addr`.
    pub fn write<T: Copy>(addr: u64, v: T) {
        // SAFETY: as for `read`.
        unsafe { core::ptr::write_volatile(addr as *mut T, v) }
    }
}
