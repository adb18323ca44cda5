//! Time keeping with the TSC, calibrated against PIT channel 2.

use crate::port::{cpuid, inb, outb, rdtsc};
use core::sync::atomic::{AtomicU64, Ordering};

static TSC_KHZ: AtomicU64 = AtomicU64::new(2_000_000);

/// Calibrates the TSC (PIT channel 2 one-shot of 10 ms; CPUID fallbacks). Returns kHz.
pub fn calibrate() -> u64 {
    let khz = pit_calibrate().or_else(cpuid_khz).unwrap_or(2_000_000);
    TSC_KHZ.store(khz, Ordering::SeqCst);
    khz
}

fn pit_calibrate() -> Option<u64> {
    const LATCH: u32 = 11932; // 10 ms at 1.193182 MHz
    let gate = inb(0x61);
    outb(0x61, (gate & !0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, (LATCH & 0xFF) as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let t0 = rdtsc();
    let mut t1 = t0;
    let mut ok = false;
    // Give up after 1e9 cycles (well under a second on anything we run on).
    while t1.wrapping_sub(t0) < 1_000_000_000 {
        if inb(0x61) & 0x20 != 0 {
            ok = true;
            break;
        }
        t1 = rdtsc();
    }
    outb(0x61, gate);
    let khz = t1.wrapping_sub(t0) / 10;
    (ok && khz > 10_000).then_some(khz)
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
