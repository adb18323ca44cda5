//! `pv.mode=mem`: dirties guest RAM with a known per-page pattern, then reads it all back
//! and checks it, over and over, so a host can tell when a restored guest has read back all
//! of its memory and whether every page came back intact. With `pv.mem.refill=1` it writes
//! the pattern again after every pass: a guest that keeps dirtying its RAM (migration tests).

use crate::port::{mmio, rdtsc};
use crate::{mem, probe, pvh, tick, time};

const PAGE: u64 = 4096;
const PAGE_BYTES: usize = 4096;
const MIB: u64 = 1 << 20;
/// Mixed into the pattern so that a page of another probe run's pattern does not match.
const SEED: u64 = 0x7076_6d65_6d63_6b31; // "pvmemck1"

/// The word every 8 bytes of the page at `page` hold: different for every page, never zero.
fn pattern(page: u64) -> u64 {
    (page ^ SEED).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1
}

/// The `k`th of `words` pattern words of the page at `page`: its offset and value.
fn word(page: u64, k: u64, words: u64) -> (u64, u64) {
    // k < words <= 512: the low 32 bits are k.
    (
        page + k * (PAGE / words),
        pattern(page).rotate_left(crate::bits::lo32(k)),
    )
}

/// Writes `words` evenly spaced pattern words into every page of `[start, start + len)`.
fn fill(start: u64, len: u64, words: u64) {
    for page in (start..start + len).step_by(PAGE_BYTES) {
        for k in 0..words {
            let (at, v) = word(page, k, words);
            mmio::write::<u64>(at, v);
        }
        tick::poll();
    }
}

/// Pages whose pattern words are not all there, and the address of the first one.
fn check(start: u64, len: u64, words: u64) -> (u64, Option<u64>) {
    let mut bad = 0u64;
    let mut first = None;
    for page in (start..start + len).step_by(PAGE_BYTES) {
        let mut diff = 0;
        for k in 0..words {
            let (at, v) = word(page, k, words);
            diff |= mmio::read::<u64>(at) ^ v;
        }
        if diff != 0 {
            bad += 1;
            first.get_or_insert(page);
        }
        tick::poll();
    }
    (bad, first)
}

/// Idles for `ms`, printing `PROBE mem idle` every `tick` ms (so a restored guest prints
/// within a tick of running again).
fn idle(ms: u64, tick: u64) {
    if ms == 0 {
        return;
    }
    let khz = time::tsc_khz();
    let end = rdtsc().wrapping_add(ms * khz);
    let period = tick.max(1) * khz;
    let mut next = rdtsc();
    while rdtsc() < end {
        if rdtsc() >= next {
            probe!("mem idle");
            next = rdtsc().wrapping_add(period);
        }
        tick::wait();
    }
}

/// Fills `pv.mem.mb` MiB (default: all RAM above the arena's used part) and checks it forever.
pub fn run() -> ! {
    let boot = pvh::info();
    let start = mem::take_rest();
    let top = boot.low_ram.max(mem::ARENA_END);
    let avail = top.saturating_sub(start) & !(PAGE - 1);
    let want = boot.arg("pv.mem.mb").and_then(pvh::parse_u64);
    let len = want.map_or(avail, |mb| mb.saturating_mul(MIB).min(avail));
    let gap = boot.arg_u64("pv.mem.gap", 100);
    // Write the pattern again after every pass (a guest that keeps dirtying its RAM).
    let refill = boot.arg_u64("pv.mem.refill", 0) != 0;
    let tick = boot.arg_u64("pv.mem.tick", 1);
    // Words per page: a power of two from 1 to 512 (every word).
    let words = boot
        .arg_u64("pv.mem.words", 2)
        .clamp(1, PAGE / 8)
        .next_power_of_two();

    let t0 = rdtsc();
    fill(start, len, words);
    let us = time::tsc_to_us(rdtsc().wrapping_sub(t0));
    probe!(
        "mem filled mb={} bytes={len} start={start:x} words={words} us={us}",
        len / MIB
    );
    let mut n = 0u64;
    loop {
        n += 1;
        idle(gap, tick);
        probe!("mem pass n={n} start");
        let t0 = rdtsc();
        let (bad, first) = check(start, len, words);
        let us = time::tsc_to_us(rdtsc().wrapping_sub(t0));
        match first {
            None => probe!("mem pass n={n} ok bytes={len} us={us}"),
            Some(at) => probe!("mem pass n={n} bad pages={bad} first={at:x} bytes={len} us={us}"),
        }
        if refill {
            fill(start, len, words);
        }
    }
}
