//! `pv.tick.us=N`: a tick byte ([`TICK`]) on COM1 every `N` µs of guest time, for a host
//! that timestamps the serial stream and measures how long the guest was not running (the
//! largest silence, e.g. across a live migration's switch). While ticks are on, the counter
//! and mem modes never halt: they spin, so a tick is late only when the vCPU did not run.
//! Tick bytes go only between lines (the serial lock), never inside one.

use crate::port::rdtsc;
use crate::{interrupts, pvh, serial, time};
use core::sync::atomic::{AtomicU64, Ordering};

/// The tick byte: ASCII SYN ("synchronous idle"), never part of a `PROBE` line.
pub const TICK: u8 = 0x16;

/// TSC ticks between two tick bytes; 0: ticks off.
static PERIOD: AtomicU64 = AtomicU64::new(0);
/// The TSC at which the next tick byte is due.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// Reads `pv.tick.us` (0 or absent: off; at least 10 µs).
pub fn init() {
    let us = pvh::info().arg_u64("pv.tick.us", 0);
    if us == 0 {
        return;
    }
    let period = (us.max(10) * time::tsc_khz() / 1000).max(1);
    NEXT.store(rdtsc(), Ordering::Relaxed);
    PERIOD.store(period, Ordering::Relaxed);
}

/// Whether ticks are on.
pub fn on() -> bool {
    PERIOD.load(Ordering::Relaxed) != 0
}

/// Writes the tick byte if one is due; the next is due a period after now (a guest that was
/// not running gets one byte, not a burst).
pub fn poll() {
    let period = PERIOD.load(Ordering::Relaxed);
    if period == 0 {
        return;
    }
    let now = rdtsc();
    if now < NEXT.load(Ordering::Relaxed) {
        return;
    }
    serial::raw(&[TICK]);
    NEXT.store(now.wrapping_add(period), Ordering::Relaxed);
}

/// Waits a little: with ticks on, one spin and a tick if due; else until the next
/// interrupt ([`interrupts::wait`]).
pub fn wait() {
    if on() {
        poll();
        core::hint::spin_loop();
    } else {
        interrupts::wait();
    }
}
