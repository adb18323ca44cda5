//! pocketvisor probe guest on arm64: an arm64 `Image` that boots from its 64-byte header with
//! the MMU off, reads its command line from the device tree, reports on the 16550 UART (on
//! MMIO at 0x0900_0000) with the same `PROBE` lines as the x86_64 probe, and powers off
//! through PSCI. Its `gic` test brings up the GICv3 and takes an SGI and virtual timer ticks
//! as interrupts. See `PROTOCOL.md` ("arm64").

#![no_std]
#![no_main]

mod fdt;
mod gic;
mod irq;
mod its;
mod pci;
mod smp;
mod uart;
mod virtio;

/// PSCI 0.2 `SYSTEM_OFF` (SMC32 function id), called with `hvc #0` as the device tree says.
const PSCI_SYSTEM_OFF: u64 = 0x8400_0008;

// The Image header (Documentation/arch/arm64/booting.rst): a branch over it, text_offset 0,
// the size the kernel occupies with its BSS and stack, little-endian, the "ARM\x64" magic.
// The entry enables FP/SIMD at EL1 (the compiler may use it), sets the stack, clears the
// BSS and calls `rust_start` with X0 = the device tree's address as the loader passes it.
core::arch::global_asm!(
    ".section .text.boot, \"ax\"",
    ".global _start",
    "_start:",
    "    b 1f",
    "    .word 0",
    "    .quad 0",
    "    .quad __image_size",
    "    .quad 0",
    "    .quad 0, 0, 0",
    "    .ascii \"ARM\\x64\"",
    "    .word 0",
    "1:",
    "    mov x1, #(3 << 20)",
    "    msr cpacr_el1, x1",
    "    isb",
    "    ldr x1, =__stack_top",
    "    mov sp, x1",
    "    ldr x1, =__bss_start",
    "    ldr x2, =__bss_end",
    "2:  cmp x1, x2",
    "    b.hs 3f",
    "    str xzr, [x1], #8",
    "    b 2b",
    "3:  bl rust_start",
    "4:  wfi",
    "    b 4b",
);

/// Entry from the boot stub with the device tree's guest physical address.
#[no_mangle]
extern "C" fn rust_start(fdt_addr: u64) -> ! {
    uart::line(format_args!("ready"));
    // SAFETY: the loader passes the address of the device tree it wrote into guest RAM; the
    // walker checks the header's magic and sizes before it reads anything else.
    let tree = unsafe { fdt::Fdt::at(fdt_addr) };
    let cmdline = tree.and_then(|t| t.bootargs()).unwrap_or("");
    uart::line(format_args!("boot ok cmdline=\"{}\"", Printable(cmdline)));
    let mode = arg(cmdline, "pv.mode").unwrap_or("selftest");
    match mode {
        "selftest" => {
            uart::line(format_args!(
                "info arch=aarch64 cntfrq_hz={} fdt={fdt_addr:x}",
                counter_hz()
            ));
            let tests = arg(cmdline, "pv.tests");
            let enabled = |name: &str| tests.is_none_or(|l| l.split(',').any(|t| t == name));
            let mut failures = 0u32;
            if enabled("pci") {
                match tree.as_ref().and_then(|t| t.pci_host()) {
                    Some(host) => {
                        if !pci::selftest(&host) {
                            failures += 1;
                        }
                    }
                    None => {
                        uart::line(format_args!("pci fail no-host-bridge"));
                        failures += 1;
                    }
                }
            }
            if enabled("blk") {
                let write = arg(cmdline, "pv.blk.write").and_then(|v| v.parse().ok());
                let passed = match tree.as_ref().and_then(|t| t.pci_host()) {
                    Some(host) => virtio::blk_selftest(&host, write),
                    None => {
                        uart::line(format_args!("blk fail no-host-bridge"));
                        false
                    }
                };
                if !passed {
                    failures += 1;
                }
            }
            if enabled("rng") {
                let passed = match tree.as_ref().and_then(|t| t.pci_host()) {
                    Some(host) => virtio::selftest(&host),
                    None => {
                        uart::line(format_args!("rng fail no-host-bridge"));
                        false
                    }
                };
                if !passed {
                    failures += 1;
                }
            }
            if enabled("gic") && !gic_test() {
                failures += 1;
            }
            if enabled("smp") {
                let passed = match &tree {
                    Some(t) => smp::selftest(t),
                    None => {
                        uart::line(format_args!("smp fail no-device-tree"));
                        false
                    }
                };
                if !passed {
                    failures += 1;
                }
            }
            if failures == 0 {
                uart::line(format_args!("done ok"));
            } else {
                uart::line(format_args!("done fail={failures}"));
            }
        }
        "counter" => counter_mode(
            arg(cmdline, "pv.counter.ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(100),
        ),
        other => {
            uart::line(format_args!("boot fail unknown-mode {other}"));
            uart::line(format_args!("done fail=1"));
        }
    }
    power_off()
}

/// The value of the last `key=value` word of `cmdline`.
fn arg<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    cmdline
        .split(' ')
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

/// Timer ticks the `gic` test waits for in `wfi` after the first.
const GIC_TEST_TICKS: u64 = 10;
/// Timer interrupts per second in the `gic` test.
const GIC_TEST_TICK_HZ: u64 = 100;

/// The `gic` test: distributor and redistributor up, an SGI to itself acknowledged and EOI'd,
/// then the virtual timer's PPI: a first tick waited for by spinning (so a dead timer is
/// reported instead of idling forever), then [`GIC_TEST_TICKS`] more with the CPU idle in
/// `wfi`. Prints `gic ok ...` or `gic fail <why>`; true when it passed.
fn gic_test() -> bool {
    if let Err(e) = gic::init_distributor().and_then(|()| gic::init_cpu()) {
        uart::line(format_args!("gic fail {e}"));
        return false;
    }
    irq::install_vectors();
    irq::enable();
    let hz = counter_hz();
    gic::send_sgi_to_self(gic::TEST_SGI);
    let deadline = counter() + hz;
    while irq::sgis() == 0 && counter() < deadline {}
    if irq::sgis() != 1 {
        uart::line(format_args!("gic fail sgi={}", irq::sgis()));
        return false;
    }
    let start = counter();
    irq::start_timer(hz / GIC_TEST_TICK_HZ);
    let deadline = start + 2 * hz;
    while irq::timer_ticks() == 0 && counter() < deadline {}
    if irq::timer_ticks() == 0 {
        irq::stop_timer();
        uart::line(format_args!("gic fail timer=dead sgi=1"));
        return false;
    }
    let mut wakes = 0u64;
    while irq::timer_ticks() < 1 + GIC_TEST_TICKS {
        irq::wait();
        wakes += 1;
    }
    irq::stop_timer();
    let elapsed_us = (counter() - start) * 1_000_000 / hz.max(1);
    uart::line(format_args!(
        "gic ok sgi={} timer=ok ticks={} wfi_wakes={wakes} other_irqs={} elapsed_us={elapsed_us}",
        irq::sgis(),
        irq::timer_ticks(),
        irq::other_irqs()
    ));
    true
}

/// The `counter` mode (the x86 probe's, which the handset's profiles run): `counter <n>`
/// every `ms` milliseconds, forever, idle in `wfi` on virtual timer ticks between lines (or
/// spinning on the counter if the GIC did not come up).
fn counter_mode(ms: u64) -> ! {
    let hz = counter_hz();
    let period = (hz * ms.max(1) / 1000).max(1);
    let timer = gic::init_distributor().and_then(|()| gic::init_cpu());
    if let Err(e) = timer {
        uart::line(format_args!("info counter-timer=spin gic={e}"));
    } else {
        irq::install_vectors();
        irq::enable();
        irq::start_timer(period);
    }
    let mut n: u64 = 0;
    loop {
        uart::line(format_args!("counter {n}"));
        n += 1;
        if timer.is_ok() {
            let seen = irq::timer_ticks();
            while irq::timer_ticks() == seen {
                irq::wait();
            }
        } else {
            let next = counter() + period;
            while counter() < next {}
        }
    }
}

/// The virtual counter (CNTVCT_EL0).
fn counter() -> u64 {
    let v: u64;
    // SAFETY: reading CNTVCT_EL0 has no side effect; the isb orders it after earlier code.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) v) };
    v
}

/// This CPU's MPIDR_EL1 (its affinity).
fn mpidr() -> u64 {
    let v: u64;
    // SAFETY: reading MPIDR_EL1 has no side effect.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) v) };
    v
}

/// The architected counter's frequency (CNTFRQ_EL0).
fn counter_hz() -> u64 {
    let hz: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effect and is allowed at EL1.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) hz) };
    hz
}

/// PSCI `SYSTEM_OFF`; waits for interrupts forever if the hypervisor returns.
fn power_off() -> ! {
    // SAFETY: an HVC to the hypervisor's PSCI handler; SYSTEM_OFF does not return on success
    // and clobbers at most x0-x3 otherwise.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") PSCI_SYSTEM_OFF => _,
            out("x1") _, out("x2") _, out("x3") _,
        )
    };
    loop {
        // SAFETY: wfi only waits for an interrupt.
        unsafe { core::arch::asm!("wfi") };
    }
}

/// A string printed with non-printable bytes and `"` as spaces (the protocol's quoting).
struct Printable<'a>(&'a str);

impl core::fmt::Display for Printable<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use core::fmt::Write;
        for b in self.0.bytes() {
            let c = if (0x20..0x7f).contains(&b) && b != b'"' {
                char::from(b)
            } else {
                ' '
            };
            f.write_char(c)?;
        }
        Ok(())
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    uart::line(format_args!("fault panic {}", info.message()));
    uart::line(format_args!("done fail=1"));
    power_off()
}
