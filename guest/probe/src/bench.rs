//! Benchmarks timed by the host: `pio-bench` (port 0x80 writes) and `blk-bench`
//! (sequential reads with several requests in flight).

use crate::port::rdtsc;
use crate::virtio::blk::{Blk, S_OK, T_IN};
use crate::virtio::queue::{Buf, Wait};
use crate::{fail, mem, probe, time};

/// `n` single-byte writes to port 0x80 between the start and end lines.
pub fn pio(n: u64) {
    probe!("pio start");
    let t0 = rdtsc();
    if n > 0 {
        // The tightest counted loop (`out; dec; jnz`): under kvm_pvm every guest instruction
        // around an exit costs about 1 us, so the loop's shape shows in the round trip. The
        // bench's raw KVM_RUN loop (bench/src/rawexit.rs, LOOP_COUNTED) runs the same code.
        // SAFETY: writes port 0x80 (POST code, no effect) `n` times; changes only rcx (declared).
        unsafe {
            core::arch::asm!(
                "2:",
                "out 0x80, al",
                "dec rcx",
                "jnz 2b",
                inout("rcx") n => _,
                in("al") 0u8,
                options(nomem, nostack),
            );
        }
    }
    let us = time::tsc_to_us(rdtsc() - t0);
    probe!("pio end iters={n}");
    probe!("pio info guest_us={us}");
}

const REQ: u64 = 64 * 1024;
const INFLIGHT: usize = 16;

/// Reads min(`mb` MiB, capacity) sequentially from the first block device, negotiating
/// VIRTIO_RING_F_EVENT_IDX when offered unless `pv.blk.event_idx=0`.
pub fn blk(mb: u64) {
    let open = if crate::pvh::info().arg_u64("pv.blk.event_idx", 1) != 0 {
        Blk::open_event_idx(0)
    } else {
        Blk::open(0)
    };
    let mut blk = match open {
        Ok(Some(b)) => b,
        Ok(None) => return fail("blk-bench", format_args!("no-device")),
        Err(e) => return fail("blk-bench", format_args!("init {e}")),
    };
    let total = (mb.saturating_mul(1 << 20)).min(blk.capacity.saturating_mul(512));
    let total = total - total % 512;
    match run(&mut blk, total) {
        Ok(us) => {
            probe!("blk-bench end bytes={total}");
            let mbps = total.checked_div(us).unwrap_or(0);
            probe!(
                "blk-bench info guest_us={us} mb_per_s={mbps} irq={} hits={} polled={} \
                 event_idx={} kicks={}",
                blk.q.irq_mode(),
                blk.q.irq_hits,
                blk.q.polled,
                u8::from(blk.event_idx()),
                blk.q.kicks
            );
        }
        Err(e) => fail("blk-bench", format_args!("{e}")),
    }
}

fn run(blk: &mut Blk, total: u64) -> Result<u64, &'static str> {
    // Per slot: 16-byte header, status byte, 64 KiB data.
    let hdrs = mem::alloc(32 * INFLIGHT as u64, 4096);
    let data = mem::alloc_uninit(REQ * INFLIGHT as u64, 4096);
    let mut heads = [u16::MAX; INFLIGHT];
    let mut next_off = 0u64;
    let mut inflight = 0usize;
    probe!("blk-bench start");
    let t0 = rdtsc();
    loop {
        // Fill every free slot.
        for (slot, head) in heads.iter_mut().enumerate() {
            if *head != u16::MAX || next_off >= total {
                continue;
            }
            let len = (total - next_off).min(REQ);
            let h = hdrs + 32 * slot as u64;
            crate::port::mmio::write::<u32>(h, T_IN);
            crate::port::mmio::write::<u32>(h + 4, 0);
            crate::port::mmio::write::<u64>(h + 8, next_off / 512);
            crate::port::mmio::write::<u8>(h + 16, 0xFF);
            let bufs = [
                Buf {
                    addr: h,
                    len: 16,
                    write: false,
                },
                Buf {
                    addr: data + REQ * slot as u64,
                    len: len as u32,
                    write: true,
                },
                Buf {
                    addr: h + 16,
                    len: 1,
                    write: true,
                },
            ];
            *head = blk.q.push(&bufs).ok_or("queue-full")?;
            next_off += len;
            inflight += 1;
        }
        blk.q.kick();
        if inflight == 0 {
            break;
        }
        if blk.q.wait_used(5000) == Wait::Timeout {
            return Err("timeout");
        }
        while let Some((id, _)) = blk.q.pop_used() {
            let slot = heads.iter().position(|&h| h == id).ok_or("bad-used-id")?;
            let h = hdrs + 32 * slot as u64;
            if crate::port::mmio::read::<u8>(h + 16) != S_OK {
                return Err("read-status");
            }
            heads[slot] = u16::MAX;
            inflight -= 1;
        }
    }
    Ok(time::tsc_to_us(rdtsc() - t0))
}
