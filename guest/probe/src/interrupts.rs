//! IDT, exception reporting, the xAPIC (EOI, timer, IPIs) and per-vector IRQ counters.
//!
//! Vectors: 0..32 exceptions (print `PROBE fault ...` and fail), 0x20 the LAPIC timer
//! (a 1 ms-ish wakeup tick for `hlt`), 0x30.. MSI-X vectors handed out by
//! [`alloc_vector`], 0xFF spurious.

use crate::port::{cr2, halt_forever, mmio};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};

/// LAPIC MMIO base (xAPIC mode).
pub const LAPIC: u64 = 0xFEE0_0000;
/// The LAPIC timer vector.
pub const TIMER_VECTOR: u8 = 0x20;
const SPURIOUS_VECTOR: u8 = 0xFF;

static IRQ_COUNT: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
static NEXT_VECTOR: AtomicU8 = AtomicU8::new(0x30);
static HLT_OK: AtomicBool = AtomicBool::new(false);

#[repr(C, align(16))]
struct Idt([u64; 512]);

static IDT: crate::sync::Global<Idt> = crate::sync::Global::new(Idt([0; 512]));

// One 16-byte stub per vector: push a zero error code unless the CPU pushed one,
// push the vector number, jump to the common path that saves registers and calls
// `isr_dispatch(frame)`.
global_asm!(
    r#"
    .section .text
    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) | ((vec >= 10) & (vec <= 14)) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call isr_dispatch
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

extern "C" {
    static isr_stubs: u8;
}

/// The register frame built by `isr_common`.
#[repr(C)]
pub struct Frame {
    regs: [u64; 15],
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

#[no_mangle]
extern "C" fn isr_dispatch(f: &Frame) {
    let v = (f.vector & 0xFF) as usize;
    if v < 32 {
        crate::serial::line_unlocked(format_args!(
            "fault vector={} error={:#x} rip={:#x} cr2={:#x} rsp={:#x} apic={}",
            v,
            f.error,
            f.rip,
            cr2(),
            f.rsp,
            lapic_id()
        ));
        let n = crate::failures() + 1;
        crate::serial::line_unlocked(format_args!("done fail={n}"));
        crate::power::fail_exit(n);
    }
    if let Some(c) = IRQ_COUNT.get(v) {
        c.fetch_add(1, Ordering::SeqCst);
    }
    if v != SPURIOUS_VECTOR as usize {
        eoi();
    }
}

/// Fills the IDT and loads it on the BSP.
pub fn init_idt() {
    let base = core::ptr::addr_of!(isr_stubs) as u64;
    let idt = IDT.get_mut();
    for v in 0..256usize {
        let h = base + 16 * v as u64;
        let lo = (h & 0xFFFF) | (0x18 << 16) | (0x8E00u64 << 32) | ((h >> 16) & 0xFFFF) << 48;
        idt.0[2 * v] = lo;
        idt.0[2 * v + 1] = h >> 32;
    }
    load_idt();
}

/// Loads the (already filled) IDT on the current CPU.
pub fn load_idt() {
    #[repr(C, packed)]
    struct Ptr {
        limit: u16,
        base: u64,
    }
    let p = Ptr {
        limit: 4095,
        base: IDT.get() as *const Idt as u64,
    };
    // SAFETY: the IDT is static, fully initialised and its stubs are valid code.
    unsafe { asm!("lidt [{}]", in(reg) &p, options(readonly, nostack, preserves_flags)) }
}

fn lapic_read(reg: u64) -> u32 {
    mmio::read::<u32>(LAPIC + reg)
}

fn lapic_write(reg: u64, v: u32) {
    mmio::write::<u32>(LAPIC + reg, v)
}

/// This CPU's LAPIC id.
pub fn lapic_id() -> u32 {
    lapic_read(0x20) >> 24
}

/// Remaps the legacy 8259 PICs to vectors 0xF0..0xFF and masks every line, so a
/// firmware-programmed PIT interrupt cannot arrive on an exception vector.
pub fn disable_pic() {
    use crate::port::outb;
    for (cmd, data, base, cascade) in [(0x20u16, 0x21u16, 0xF0u8, 4u8), (0xA0, 0xA1, 0xF8, 2)] {
        outb(cmd, 0x11);
        outb(data, base);
        outb(data, cascade);
        outb(data, 0x01);
        outb(data, 0xFF);
    }
}

/// Software-enables this CPU's LAPIC (spurious vector 0xFF) and accepts all priorities.
pub fn lapic_enable() {
    lapic_write(0x80, 0);
    lapic_write(0xF0, 0x100 | SPURIOUS_VECTOR as u32);
}

/// Signals end of interrupt.
pub fn eoi() {
    lapic_write(0xB0, 0);
}

/// Starts the periodic LAPIC timer (about 1 ms with a 1 GHz APIC bus) and checks that
/// it actually interrupts; if not, waits fall back to spinning.
pub fn start_timer() -> bool {
    lapic_write(0x3E0, 0x3); // divide by 16
    lapic_write(0x320, (1 << 17) | TIMER_VECTOR as u32);
    lapic_write(0x380, 62_500);
    let before = irq_count(TIMER_VECTOR);
    enable();
    let dl = crate::time::deadline_ms(100);
    while !crate::time::expired(dl) && irq_count(TIMER_VECTOR) == before {
        core::hint::spin_loop();
    }
    disable();
    let ok = irq_count(TIMER_VECTOR) != before;
    HLT_OK.store(ok, Ordering::SeqCst);
    ok
}

/// Stops the periodic tick: from then on only device interrupts end a [`wait`].
pub fn stop_timer() {
    lapic_write(0x380, 0);
}

/// Switches this CPU's LAPIC timer from the periodic tick to TSC-deadline mode (if the CPU
/// has it): from then on the timer fires only at the deadline [`set_deadline`] programs, so
/// an idle CPU sleeps until its next piece of work. Returns whether it switched.
pub fn one_shot_timer() -> bool {
    if crate::port::cpuid(1, 0)[2] & (1 << 24) == 0 {
        return false;
    }
    lapic_write(0x380, 0); // stop the periodic count
    lapic_write(0x320, (2 << 17) | TIMER_VECTOR as u32);
    true
}

/// Arms the TSC-deadline timer for `tsc` (0 disarms it).
pub fn set_deadline(tsc: u64) {
    crate::port::wrmsr(0x6E0, tsc);
}

/// Sends an IPI: `icr_low` to the LAPIC `dest`; waits for delivery.
pub fn send_ipi(dest: u32, icr_low: u32) {
    lapic_write(0x310, dest << 24);
    lapic_write(0x300, icr_low);
    for _ in 0..1_000_000 {
        if lapic_read(0x300) & (1 << 12) == 0 {
            break;
        }
        core::hint::spin_loop();
    }
}

/// Interrupts seen on `vector` so far.
pub fn irq_count(vector: u8) -> u32 {
    IRQ_COUNT[vector as usize].load(Ordering::SeqCst)
}

/// Allocates a fresh device vector (0x30..0xEF); `None` when exhausted.
pub fn alloc_vector() -> Option<u8> {
    let v = NEXT_VECTOR.fetch_add(1, Ordering::SeqCst);
    (0x30..0xF0).contains(&v).then_some(v)
}

/// Whether `sti; hlt` waits are usable (the timer wakes us).
pub fn hlt_ok() -> bool {
    HLT_OK.load(Ordering::Relaxed)
}

/// Waits for the next interrupt (`sti; hlt`), or just spins once if the timer is dead.
pub fn wait() {
    if hlt_ok() {
        // SAFETY: sti's one-instruction shadow makes `sti; hlt` race-free; the handlers
        // are installed; interrupts are disabled again afterwards.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
    } else {
        core::hint::spin_loop();
    }
}

/// Enables interrupts on this CPU.
pub fn enable() {
    // SAFETY: the IDT is loaded before this is called.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disables interrupts on this CPU.
pub fn disable() {
    // SAFETY: cli only masks interrupts.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Halts this CPU forever (used by APs once they checked in).
pub fn park() -> ! {
    halt_forever()
}
