//! Exception vectors and the interrupt counters: an IRQ is acknowledged (ICC_IAR1_EL1),
//! counted (timer, SGI, LPI or other), and ended (ICC_EOIR1_EL1) by a handler written in assembly, so it touches only
//! the four general registers it saves (no FP/SIMD state of the interrupted code). A virtual
//! timer tick re-arms the timer for the next tick. Any other exception is reported as a
//! fault and powers off.

use core::sync::atomic::{AtomicU64, Ordering};

/// Virtual timer interrupts taken.
#[no_mangle]
static PV_TIMER_TICKS: AtomicU64 = AtomicU64::new(0);
/// SGIs taken.
#[no_mangle]
static PV_SGIS: AtomicU64 = AtomicU64::new(0);
/// The INTID of the last LPI taken.
#[no_mangle]
static PV_LAST_LPI: AtomicU64 = AtomicU64::new(0);
/// LPIs taken (MSIs translated by the ITS).
#[no_mangle]
static PV_LPIS: AtomicU64 = AtomicU64::new(0);
/// Other interrupts taken (neither the timer, an SGI nor an LPI).
#[no_mangle]
static PV_OTHER_IRQS: AtomicU64 = AtomicU64::new(0);
/// Counter ticks between two timer interrupts (CNTV_TVAL_EL0's reload).
#[no_mangle]
static PV_TICK_PERIOD: AtomicU64 = AtomicU64::new(0);

// VBAR_EL1's table: 16 entries of 128 bytes; the probe runs at EL1 on SP_EL1, so IRQs come
// to "current EL with SPx, IRQ" (0x280). Every other entry reports its index as a fault.
core::arch::global_asm!(
    ".section .text.vectors, \"ax\"",
    ".balign 2048",
    ".global pv_vectors",
    "pv_vectors:",
    ".set idx, 0",
    ".rept 16",
    "    .if idx == 5",
    "    b pv_irq_entry",
    "    .else",
    "    mov x0, #idx",
    "    b pv_unexpected_entry",
    "    .endif",
    "    .balign 128",
    "    .set idx, idx + 1",
    ".endr",
    "pv_unexpected_entry:",
    "    mrs x1, esr_el1",
    "    mrs x2, elr_el1",
    "    b pv_unexpected_exception",
    "pv_irq_entry:",
    "    stp x0, x1, [sp, #-32]!",
    "    stp x2, x3, [sp, #16]",
    "    mrs x0, S3_0_C12_C12_0",
    "    and x1, x0, #0xffffff",
    // INTIDs 1020-8191 are special (1023: spurious) or unused: nothing to EOI. LPIs start at
    // 8192.
    "    cmp x1, #1020",
    "    b.lo 5f",
    "    cmp x1, #8192",
    "    b.lo 9f",
    "5:  cmp x1, #27",
    "    b.ne 1f",
    "    adrp x2, PV_TICK_PERIOD",
    "    ldr x3, [x2, :lo12:PV_TICK_PERIOD]",
    "    msr cntv_tval_el0, x3",
    "    adrp x2, PV_TIMER_TICKS",
    "    add x2, x2, :lo12:PV_TIMER_TICKS",
    "    b 3f",
    "1:  cmp x1, #16",
    "    b.hs 2f",
    "    adrp x2, PV_SGIS",
    "    add x2, x2, :lo12:PV_SGIS",
    "    b 3f",
    "2:  cmp x1, #8192",
    "    b.lo 4f",
    "    adrp x2, PV_LAST_LPI",
    "    str x1, [x2, :lo12:PV_LAST_LPI]",
    "    adrp x2, PV_LPIS",
    "    add x2, x2, :lo12:PV_LPIS",
    "    b 3f",
    "4:  adrp x2, PV_OTHER_IRQS",
    "    add x2, x2, :lo12:PV_OTHER_IRQS",
    "3:  ldr x3, [x2]",
    "    add x3, x3, #1",
    "    str x3, [x2]",
    "    msr S3_0_C12_C12_1, x0",
    "9:  ldp x2, x3, [sp, #16]",
    "    ldp x0, x1, [sp], #32",
    "    eret",
);

/// Installs the vector table (before interrupts are unmasked).
pub fn install_vectors() {
    // SAFETY: `pv_vectors` is the 2 KiB-aligned table above; VBAR_EL1 only says where
    // exceptions go, and all of them are masked until `enable`.
    unsafe {
        core::arch::asm!(
            "adrp {t}, pv_vectors",
            "add {t}, {t}, :lo12:pv_vectors",
            "msr vbar_el1, {t}",
            "isb",
            t = out(reg) _,
        )
    };
}

/// Unmasks IRQs at this CPU.
pub fn enable() {
    // SAFETY: the vectors are installed; the handler preserves the interrupted state.
    unsafe { core::arch::asm!("msr daifclr, #2", "isb") };
}

/// Waits for an interrupt.
pub fn wait() {
    // SAFETY: wfi only waits; an interrupt (or nothing, spuriously) ends it.
    unsafe { core::arch::asm!("wfi") };
}

/// Timer interrupts taken so far.
pub fn timer_ticks() -> u64 {
    PV_TIMER_TICKS.load(Ordering::SeqCst)
}

/// SGIs taken so far.
pub fn sgis() -> u64 {
    PV_SGIS.load(Ordering::SeqCst)
}

/// LPIs taken so far.
pub fn lpis() -> u64 {
    PV_LPIS.load(Ordering::SeqCst)
}

/// The INTID of the last LPI taken (0 before the first).
pub fn last_lpi() -> u64 {
    PV_LAST_LPI.load(Ordering::SeqCst)
}

/// Other interrupts taken so far.
pub fn other_irqs() -> u64 {
    PV_OTHER_IRQS.load(Ordering::SeqCst)
}

/// Starts the virtual timer, interrupting every `period` counter ticks.
pub fn start_timer(period: u64) {
    PV_TICK_PERIOD.store(period, Ordering::SeqCst);
    // SAFETY: CNTV_TVAL_EL0/CNTV_CTL_EL0 program this CPU's virtual timer (ENABLE, unmasked).
    unsafe {
        core::arch::asm!(
            "msr cntv_tval_el0, {p}",
            "msr cntv_ctl_el0, {one}",
            "isb",
            p = in(reg) period,
            one = in(reg) 1u64,
        )
    };
}

/// Stops the virtual timer.
pub fn stop_timer() {
    // SAFETY: clearing CNTV_CTL_EL0 disables the virtual timer.
    unsafe { core::arch::asm!("msr cntv_ctl_el0, xzr", "isb") };
}

/// Any exception but an IRQ at EL1: a fault line, and power off.
#[no_mangle]
extern "C" fn pv_unexpected_exception(vector: u64, esr: u64, elr: u64) -> ! {
    crate::uart::line(format_args!(
        "fault exception vector={vector} esr={esr:x} elr={elr:x}"
    ));
    crate::uart::line(format_args!("done fail=1"));
    crate::power_off()
}
