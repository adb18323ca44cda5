//! SMP bring-up: INIT-SIPI-SIPI every enabled MADT processor through a real-mode
//! trampoline copied to 0x8000; each AP enters long mode, prints its line and halts.

use crate::interrupts::{lapic_enable, lapic_id, load_idt, send_ipi};
use crate::port::{cr3, mmio};
use crate::{acpi, mem, probe, time};
use core::arch::global_asm;
use core::ptr::addr_of;
use core::sync::atomic::{AtomicU32, Ordering};

/// Where the trampoline runs (page 8, SIPI vector 0x08).
const TRAMPOLINE: u64 = 0x8000;
const AP_STACK: u64 = 16 * 1024;

global_asm!(
    r#"
    .section .rodata.trampoline, "a"
    .balign 16
    .globl ap_tramp_start, ap_tramp_end, ap_tramp_cr3, ap_tramp_stack, ap_tramp_entry
    .code16
ap_tramp_start:
    cli
    cld
    xor %ax, %ax
    mov %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start + 0x8000)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x08, $(ap_tramp_pm - ap_tramp_start + 0x8000)
    .code32
ap_tramp_pm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov (ap_tramp_cr3 - ap_tramp_start + 0x8000), %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000000, %eax
    mov %eax, %cr0
    ljmp $0x18, $(ap_tramp_lm - ap_tramp_start + 0x8000)
    .code64
ap_tramp_lm:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $(ap_tramp_stack - ap_tramp_start + 0x8000), %rbx
    mov (%rbx), %rsp
    mov $(ap_tramp_entry - ap_tramp_start + 0x8000), %rbx
    mov (%rbx), %rax
    call *%rax
1:
    cli
    hlt
    jmp 1b
    .balign 8
ap_tramp_cr3:
    .quad 0
ap_tramp_stack:
    .quad 0
ap_tramp_entry:
    .quad 0
ap_tramp_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
ap_tramp_gdtr:
    .word 31
    .long ap_tramp_gdt - ap_tramp_start + 0x8000
ap_tramp_end:
"#,
    options(att_syntax)
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static ap_tramp_cr3: u8;
    static ap_tramp_stack: u8;
    static ap_tramp_entry: u8;
}

static AP_STARTED: AtomicU32 = AtomicU32::new(0);
static AP_NEXT_INDEX: AtomicU32 = AtomicU32::new(1);

extern "C" fn ap_main() -> ! {
    load_idt();
    lapic_enable();
    let idx = AP_NEXT_INDEX.fetch_add(1, Ordering::SeqCst);
    probe!("cpu {} up apic={}", idx, lapic_id());
    AP_STARTED.fetch_add(1, Ordering::SeqCst);
    crate::interrupts::park()
}

/// Where trampoline symbol `addr` lands once the trampoline is copied to 0x8000.
fn slot(addr: *const u8) -> u64 {
    TRAMPOLINE + addr as u64 - addr_of!(ap_tramp_start) as u64
}

fn install_trampoline() {
    let start = addr_of!(ap_tramp_start) as u64;
    let len = addr_of!(ap_tramp_end) as u64 - start;
    mem::copy(start, TRAMPOLINE, crate::bits::usize_from(len));
    mmio::write::<u64>(slot(addr_of!(ap_tramp_cr3)), cr3());
    mmio::write::<u64>(slot(addr_of!(ap_tramp_entry)), ap_main as *const () as u64);
}

/// Starts one AP and waits (up to 500 ms) until it has checked in.
fn start_ap(apic: u32) -> bool {
    let stack = mem::alloc(AP_STACK, 4096) + AP_STACK;
    mmio::write::<u64>(slot(addr_of!(ap_tramp_stack)), stack);
    let before = AP_STARTED.load(Ordering::SeqCst);
    send_ipi(apic, 0x0000_4500); // INIT, level assert
    time::delay_ms(10);
    for _ in 0..2 {
        send_ipi(apic, 0x0000_4600 | crate::bits::lo32(TRAMPOLINE >> 12)); // STARTUP
        time::delay_us(200);
        if AP_STARTED.load(Ordering::SeqCst) != before {
            return true;
        }
    }
    let dl = time::deadline_ms(500);
    while !time::expired(dl) {
        if AP_STARTED.load(Ordering::SeqCst) != before {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// The `smp` selftest part.
pub fn selftest() {
    let bsp = lapic_id();
    probe!("cpu 0 up apic={bsp}");
    let Some(cpus) = acpi::madt_cpus(crate::pvh::info().rsdp) else {
        crate::fail("smp", format_args!("no-madt"));
        return;
    };
    install_trampoline();
    let mut missing = 0;
    for &id in &cpus.ids[..cpus.count] {
        if id != bsp && !start_ap(id) {
            missing += 1;
            probe!("smp cpu apic={id} timeout");
        }
    }
    let up = 1 + AP_STARTED.load(Ordering::SeqCst);
    if missing == 0 {
        probe!("smp ok count={up}");
    } else {
        crate::fail("smp", format_args!("expected={} up={}", cpus.count, up));
    }
}
