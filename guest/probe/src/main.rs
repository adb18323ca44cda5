//! pocketvisor probe guest: a tiny bare-metal x86_64 kernel booted through PVH that
//! drives every device of the platform and reports one `PROBE ...` line per result on
//! COM1. See `PROTOCOL.md` for the output protocol and command-line keys.

#![no_std]
#![no_main]

mod acpi;
mod agent;
mod bench;
mod bits;
mod boot;
mod echo;
mod hostile;
mod interrupts;
mod mem;
mod memcheck;
mod paging;
mod pci;
mod port;
mod power;
mod pvh;
mod screen;
mod serial;
mod smp;
mod sync;
mod tick;
mod time;
mod virtio;

use core::sync::atomic::{AtomicU32, Ordering};

static FAILURES: AtomicU32 = AtomicU32::new(0);

/// Number of failures reported so far.
pub fn failures() -> u32 {
    FAILURES.load(Ordering::SeqCst)
}

/// Reports `PROBE <test> fail <reason>` and counts the failure.
pub fn fail(test: &str, reason: core::fmt::Arguments) {
    FAILURES.fetch_add(1, Ordering::SeqCst);
    probe!("{test} fail {reason}");
}

/// Entry from the boot stub, in long mode on the BSP stack.
#[no_mangle]
extern "C" fn rust_start(start_info: u32, entry_tsc: u64) -> ! {
    serial::init();
    probe!("ready");
    let ready_tsc = port::rdtsc();
    pvh::init(start_info as u64);
    let boot = pvh::info();
    probe!("boot ok cmdline=\"{}\"", boot.cmdline());
    if boot.low_ram != 0 && boot.low_ram < mem::ARENA_END + (16 << 20) {
        fail("boot", format_args!("ram-too-small bytes={}", boot.low_ram));
        finish();
    }
    mem::init();
    time::calibrate();
    interrupts::init_idt();
    interrupts::disable_pic();
    interrupts::lapic_enable();
    let timer_ok = interrupts::start_timer();
    tick::init();

    let mode = boot.arg("pv.mode").unwrap_or("selftest");
    if mode != "counter" {
        probe!(
            "info tsc_khz={} timer={} apic={} entry_to_ready_us={}",
            time::tsc_khz(),
            if timer_ok { "ok" } else { "dead" },
            interrupts::lapic_id(),
            time::tsc_to_us(ready_tsc.wrapping_sub(entry_tsc))
        );
    }
    match mode {
        "counter" => counter(boot.arg_u64("pv.counter.ms", 100)),
        "blk-counter" => virtio::blk::counter(boot.arg_u64("pv.counter.ms", 100)),
        "agent" => agent::run(),
        "echo" => echo::run(),
        "hostile" => hostile::run(),
        "mem" => memcheck::run(),
        "screen" => screen::run(),
        "pio-bench" => bench::pio(boot.arg_u64("pv.pio.iters", 1_000_000)),
        "blk-bench" => bench::blk(boot.arg_u64("pv.blk.mb", 64)),
        "selftest" => selftest(),
        // Exercises the exception path (host tests of crash reporting).
        "fault" => {
            // SAFETY: ud2 raises #UD, which the IDT reports and turns into a failure exit.
            unsafe { core::arch::asm!("ud2") }
        }
        other => fail("boot", format_args!("unknown-mode {other}")),
    }
    finish()
}

/// Prints the final line and powers off (success) or debug-exits (failure).
fn finish() -> ! {
    let n = failures();
    if n == 0 {
        probe!("done ok");
        power::poweroff()
    } else {
        probe!("done fail={n}");
        power::fail_exit(n)
    }
}

fn counter(ms: u64) -> ! {
    let period = ms.max(1) * time::tsc_khz();
    let mut next = port::rdtsc();
    let mut n: u64 = 0;
    let mut twin = virtio::TwinWatch::open();
    loop {
        twin.check();
        probe!("counter {n}");
        n += 1;
        next += period;
        while port::rdtsc() < next {
            tick::wait();
        }
    }
}

fn test_enabled(name: &str) -> bool {
    match pvh::info().arg("pv.tests") {
        None => true,
        Some(list) => list.split(',').any(|t| t == name),
    }
}

fn selftest() {
    if test_enabled("pci") {
        pci::selftest();
    }
    if test_enabled("smp") {
        smp::selftest();
    }
    if test_enabled("blk") {
        virtio::blk::selftest();
    }
    if test_enabled("rng") {
        virtio::rng::selftest();
    }
    if test_enabled("net") {
        virtio::net::selftest();
    }
    if test_enabled("vsock") {
        virtio::vsock::selftest();
    }
    if test_enabled("balloon") {
        virtio::balloon::selftest();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::line_unlocked(format_args!("fault panic {}", info.message()));
    let n = failures() + 1;
    serial::line_unlocked(format_args!("done fail={n}"));
    power::fail_exit(n)
}
