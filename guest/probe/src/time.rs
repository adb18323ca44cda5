//! Time keeping with the TSC, calibrated against PIT channel 2.

use crate::port::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(2_000_000);

/// Calibrates the TSC against PIT channel 2 (about 10 ms; CPUID fallbacks). Returns kHz.
pub fn calibrate() -> u64 {
    let khz = pit_calibrate().or_else(cpuid_khz).unwrap_or(2_000_000);
    TSC_KHZ.store(khz, Ordering::SeqCst);
    khz
}

/// Reads PIT channel 2's current count (latched), with the TSC at the middle of the read.
/// A read that took long (the vCPU was descheduled inside it) is retried.
fn pit_count() -> (u16, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..8 {
        let t0 = rdtsc();
        outb(0x43, 0x80); // latch channel 2
        let lo = inb(0x42) as u16;
        let hi = inb(0x42) as u16;
        let t1 = rdtsc();
        let took = t1.wrapping_sub(t0);
        if took < best.2 {
            best = ((hi << 8) | lo, t0 + took / 2, took);
        }
        if took < 500_000 {
            break;
        }
    }
    (best.0, best.1)
}

/// Whether PIT channel 2's output is high (port 0x61 bit 5). In mode 0 it goes high when
/// the count passes zero and stays high until the channel is programmed again, so it tells
/// whether the 16-bit counter wrapped since then.
fn pit_out_high() -> bool {
    inb(0x61) & 0x20 != 0
}

/// Starts PIT channel 2 counting down from 0xFFFF in mode 0 (its output low until it wraps).
fn pit_start() {
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, 0xFF);
    outb(0x42, 0xFF);
}

/// Counts TSC ticks against PIT channel 2 ticks over at least 10 ms of PIT time.
///
/// Reading the counter (instead of waiting for OUT) is immune to when counting started and to
/// the vCPU being descheduled between two reads, as long as the 16-bit counter did not wrap
/// in between (55 ms): a vCPU descheduled longer than that (a loaded host) would otherwise
/// see a fraction of the ticks that passed and compute a TSC rate many times too high (seen:
/// 97 GHz on a 2.6 GHz host, which stretched every guest wait 37 times). So a reading counts
/// only if the channel's output was still low after it (no wrap yet); when it is high the
/// span measured so far is kept and the channel restarts, and the spans add up.
fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    /// 10 ms of PIT ticks.
    const WINDOW: u64 = 11932;
    // Without a PIT (reads of 0xFF, no ticks) give up after 1e9 cycles, well under a second
    // on anything we run on; with one, after 2e10 (a host stopping the guest most of the time).
    const NO_PIT_BUDGET: u64 = 1_000_000_000;
    const BUDGET: u64 = 20_000_000_000;
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01);
    let begin = rdtsc();
    let (mut ticks, mut tsc) = (0u64, 0u64);
    let mut result = None;
    // Out of time, with `seen` ticks counted so far.
    let out_of_time = |seen: u64| {
        let elapsed = rdtsc().wrapping_sub(begin);
        elapsed > BUDGET || (seen == 0 && elapsed > NO_PIT_BUDGET)
    };
    'spans: while ticks < WINDOW {
        if out_of_time(ticks) {
            break;
        }
        pit_start();
        let (c0, t0) = pit_count();
        if pit_out_high() {
            // Descheduled for a whole wrap before the first reading: start again.
            continue;
        }
        let (mut c_last, mut t_last) = (c0, t0);
        loop {
            if out_of_time(ticks + u64::from(c0.wrapping_sub(c_last))) {
                break 'spans;
            }
            let (c, t) = pit_count();
            if pit_out_high() {
                // The counter wrapped after the last good reading (or before this one): the
                // span up to the last good reading stands; restart for the next one.
                break;
            }
            (c_last, t_last) = (c, t);
            if ticks + u64::from(c0.wrapping_sub(c_last)) >= WINDOW {
                break;
            }
        }
        ticks += u64::from(c0.wrapping_sub(c_last));
        tsc += t_last.wrapping_sub(t0);
    }
    if ticks >= WINDOW {
        result = Some(tsc * PIT_HZ / ticks / 1000);
    }
    outb(0x61, gate);
    result.filter(|&khz| khz > 10_000)
}

fn cpuid_khz() -> Option<u64> {
    if cpuid(0x4000_0000, 0)[0] >= 0x4000_0010 {
        let khz = cpuid(0x4000_0010, 0)[0] as u64;
        if khz != 0 {
            return Some(khz);
        }
    }
    if cpuid(0, 0)[0] >= 0x16 {
        let mhz = cpuid(0x16, 0)[0] as u64 & 0xFFFF;
        if mhz != 0 {
            return Some(mhz * 1000);
        }
    }
    None
}

/// TSC ticks per millisecond.
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Milliseconds since TSC reset.
pub fn now_ms() -> u64 {
    rdtsc() / tsc_khz()
}

/// Microseconds between two TSC readings.
pub fn tsc_to_us(delta: u64) -> u64 {
    delta.saturating_mul(1000) / tsc_khz()
}

/// A TSC deadline `ms` milliseconds from now.
pub fn deadline_ms(ms: u64) -> u64 {
    rdtsc().saturating_add(ms.saturating_mul(tsc_khz()))
}

/// Whether a deadline from [`deadline_ms`] has passed.
pub fn expired(deadline: u64) -> bool {
    rdtsc() >= deadline
}

/// Busy-waits `us` microseconds.
pub fn delay_us(us: u64) {
    let end = rdtsc().saturating_add(us.saturating_mul(tsc_khz()) / 1000);
    while rdtsc() < end {
        core::hint::spin_loop();
    }
}

/// Busy-waits `ms` milliseconds.
pub fn delay_ms(ms: u64) {
    delay_us(ms.saturating_mul(1000));
}
