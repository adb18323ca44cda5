//! PVH entry: the ELF note, the 32-bit stub that zeroes .bss, loads prebuilt identity page
//! tables (first 4 GiB, 2 MiB pages, 3..4 GiB uncached), enters long mode and calls
//! [`crate::rust_start`] with the physical address of `hvm_start_info` and the entry TSC.
//!
//! The stub does as little work as possible: on hypervisors that emulate guest
//! instructions (kvm_pvm here) every instruction costs about a microsecond.

use core::arch::global_asm;

/// Size of the bootstrap processor's stack.
pub const BSP_STACK_SIZE: usize = 64 * 1024;

// XEN_ELFNOTE_PHYS32_ENTRY (18): name "Xen", 8-byte descriptor holding the
// 32-bit entry address (upper half zero, so 4- and 8-byte readers agree).
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4
"#,
    options(att_syntax)
);

global_asm!(
    r#"
    .section .text.boot, "ax", @progbits
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld
    mov %ebx, %esi
    /* entry TSC in ebx:ebp (reported in the info line) */
    rdtsc
    mov %eax, %ebp
    mov %edx, %ebx

    lgdt boot_gdtr
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    ljmp $0x18, $pvh_start64

    .code64
pvh_start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $boot_stack_top, %rsp
    /* zero .bss (the stack and the page tables live elsewhere) */
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    shr $3, %ecx
    xor %eax, %eax
    rep stosq
    mov %esi, %edi
    mov %ebx, %esi
    shl $32, %rsi
    mov %ebp, %eax
    or %rax, %rsi
    call rust_start
3:
    cli
    hlt
    jmp 3b

    .section .rodata
    .balign 16
    .globl boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AF9A000000FFFF
boot_gdt_end:
    .balign 8
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    /* Identity map of the first 4 GiB with 2 MiB pages, 3..4 GiB uncached; prebuilt so
       the stub does no work (instructions are expensive on emulating hypervisors). */
    .section .data.pagetables, "aw", @progbits
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 3
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0
boot_pd:
    .set pde, 0
    .rept 1536
    .quad (pde << 21) + 0x83
    .set pde, pde + 1
    .endr
    .rept 512
    .quad (pde << 21) + 0x9B
    .set pde, pde + 1
    .endr

    /* The BSP stack is not zeroed at boot. */
    .section .stack, "aw", @nobits
    .balign 4096
boot_stack:
    .skip {stack}
boot_stack_top:
"#,
    stack = const BSP_STACK_SIZE,
    options(att_syntax)
);
