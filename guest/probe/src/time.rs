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

/// Counts TSC ticks against PIT channel 2 ticks over about 10 ms. Reading the counter
/// (instead of waiting for OUT) is immune to when counting started and to the vCPU being
/// descheduled in between: only the two end points matter.
fn pit_calibrate() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const WINDOW: u16 = 11932; // 10 ms
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01);
    outb(0x43, 0xB0); // channel 2, lobyte/hibyte, mode 0
    outb(0x42, 0xFF);
    outb(0x42, 0xFF);
    let (c0, t0) = pit_count();
    let mut result = None;
    // Give up after 1e9 cycles (well under a second on anything we run on).
    while rdtsc().wrapping_sub(t0) < 1_000_000_000 {
        let (c, t) = pit_count();
        let ticks = c0.wrapping_sub(c);
        if (WINDOW..0x8000).contains(&ticks) {
            result = Some(t.wrapping_sub(t0) * PIT_HZ / ticks as u64 / 1000);
            break;
        }
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
