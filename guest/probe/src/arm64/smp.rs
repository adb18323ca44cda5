//! The `smp` test on arm64: every CPU the device tree lists is started through PSCI
//! `CPU_ON`; each secondary brings up its own GIC redistributor and CPU interface and reports
//! in through its own slot of plain memory (no locks: with the MMU off, exclusive accesses
//! are not guaranteed to work), which the boot CPU reads and prints. Secondaries then idle
//! in `wfi` with interrupts masked.

use core::sync::atomic::{AtomicU64, Ordering};

/// Most CPUs the probe starts (and has stacks for).
pub const MAX_CPUS: usize = 16;
/// Each secondary's stack.
const STACK_SIZE: usize = 16 * 1024;
/// PSCI 0.2 `CPU_ON` (SMC64 function id).
const PSCI_CPU_ON: u64 = 0xC400_0003;
/// How long the boot CPU waits for each secondary to report, in seconds of the counter
/// (generous: the arm64 checks run nested under TCG on a loaded machine).
const WAIT_S: u64 = 5;

/// A secondary's report: 0 until it ran; then its MPIDR's affinity with bit 63 set (so a
/// report is never 0), and bit 62 set if its GIC CPU init failed.
const REPORTED: u64 = 1 << 63;
const GIC_FAILED: u64 = 1 << 62;
const MPIDR_AFFINITY: u64 = 0xff_00ff_ffff;

#[repr(C, align(16))]
struct Stacks([[u8; STACK_SIZE]; MAX_CPUS]);

/// The secondaries' stacks (BSS); the entry stub computes each CPU's top from its index.
#[no_mangle]
static mut PV_SECONDARY_STACKS: Stacks = Stacks([[0; STACK_SIZE]; MAX_CPUS]);

/// One report slot per CPU index.
static REPORTS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];

// A secondary's first instruction (PSCI CPU_ON's entry point, MMU off, X0 = its index as the
// context id): FP/SIMD on, its stack, then Rust.
core::arch::global_asm!(
    ".section .text, \"ax\"",
    ".global pv_secondary_entry",
    "pv_secondary_entry:",
    "    mov x1, #(3 << 20)",
    "    msr cpacr_el1, x1",
    "    isb",
    "    adrp x1, PV_SECONDARY_STACKS",
    "    add x1, x1, :lo12:PV_SECONDARY_STACKS",
    "    add x2, x0, #1",
    "    mov x3, #{stack}",
    "    madd x1, x2, x3, x1",
    "    mov sp, x1",
    "    bl pv_secondary_start",
    "1:  wfi",
    "    b 1b",
    stack = const STACK_SIZE,
);

extern "C" {
    fn pv_secondary_entry();
}

#[no_mangle]
extern "C" fn pv_secondary_start(index: u64) -> ! {
    let gic = crate::gic::init_cpu();
    let mut report = (crate::mpidr() & MPIDR_AFFINITY) | REPORTED;
    if gic.is_err() {
        report |= GIC_FAILED;
    }
    if let Some(slot) = usize::try_from(index).ok().and_then(|i| REPORTS.get(i)) {
        slot.store(report, Ordering::SeqCst);
    }
    // SAFETY: a full barrier so the report is visible before the CPU idles.
    unsafe { core::arch::asm!("dsb sy") };
    loop {
        crate::irq::wait();
    }
}

fn cpu_on(mpidr: u64, entry: u64, context: u64) -> i64 {
    let ret: u64;
    // SAFETY: PSCI CPU_ON through the hypervisor: it starts the CPU `mpidr` at `entry` (our
    // secondary stub, MMU off) with X0 = `context`; it clobbers at most x0-x3 here.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") PSCI_CPU_ON => ret,
            inout("x1") mpidr => _,
            inout("x2") entry => _,
            inout("x3") context => _,
        )
    };
    ret as i64
}

/// Starts each CPU of the device tree and prints `cpu <i> up mpidr=<hex>` for each that
/// reported, then `smp ok count=<n>`; false (after `smp fail expected=<m> up=<n>`) if one
/// did not come up or its GIC init failed.
pub fn selftest(fdt: &crate::fdt::Fdt) -> bool {
    let me = crate::mpidr() & MPIDR_AFFINITY;
    let mut cpus = [0u64; MAX_CPUS];
    let mut count = 0usize;
    let mut too_many = false;
    let walked = fdt.for_each_cpu(|mpidr| match cpus.get_mut(count) {
        Some(slot) => {
            *slot = mpidr & MPIDR_AFFINITY;
            count += 1;
        }
        None => too_many = true,
    });
    if walked.is_none() || count == 0 || too_many {
        crate::uart::line(format_args!(
            "smp fail device-tree cpus={count} more={too_many}"
        ));
        return false;
    }
    let hz = crate::counter_hz();
    let mut up = 0usize;
    let mut gic_failed = 0usize;
    for (index, &mpidr) in cpus[..count].iter().enumerate() {
        if mpidr == me {
            crate::uart::line(format_args!("cpu {index} up mpidr={mpidr:x}"));
            up += 1;
            continue;
        }
        let entry = pv_secondary_entry as *const () as u64;
        let ret = cpu_on(mpidr, entry, index as u64);
        if ret != 0 {
            crate::uart::line(format_args!("smp cpu mpidr={mpidr:x} cpu_on={ret}"));
            continue;
        }
        let deadline = crate::counter() + WAIT_S * hz;
        let mut report = 0;
        while report == 0 && crate::counter() < deadline {
            report = REPORTS[index].load(Ordering::SeqCst);
        }
        if report == 0 {
            crate::uart::line(format_args!("smp cpu mpidr={mpidr:x} timeout"));
            continue;
        }
        let reported = report & MPIDR_AFFINITY;
        if reported != mpidr {
            crate::uart::line(format_args!(
                "smp cpu mpidr={mpidr:x} reported-mpidr={reported:x}"
            ));
            continue;
        }
        if report & GIC_FAILED != 0 {
            crate::uart::line(format_args!("smp cpu mpidr={mpidr:x} gic-init-failed"));
            gic_failed += 1;
            continue;
        }
        crate::uart::line(format_args!("cpu {index} up mpidr={mpidr:x}"));
        up += 1;
    }
    if up == count {
        crate::uart::line(format_args!("smp ok count={up}"));
        true
    } else {
        crate::uart::line(format_args!(
            "smp fail expected={count} up={up} gic_failed={gic_failed}"
        ));
        false
    }
}
