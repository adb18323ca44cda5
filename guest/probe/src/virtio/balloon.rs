//! virtio-balloon driver (virtio 1.1 section 5.5) and the `balloon` selftest part: free page
//! reporting of a touched region, then inflating to the host's target (`num_pages`).
//!
//! The balloon works on RAM above the probe's arena (`mem::ARENA_END`), which nothing else
//! uses: region A (`pv.balloon.mb` MiB) is touched and reported free, region B (the rest of
//! low RAM, at most [`MAX_INFLATE_MIB`]) is touched and then handed to the inflate queue.

use super::pci::VirtioPci;
use super::queue::{Buf, Queue, Wait};
use crate::{fail, mem, probe, pvh, time};

/// Virtio type of memory balloons.
pub const TYPE: u16 = 5;
/// `VIRTIO_BALLOON_F_STATS_VQ`: negotiated when offered (as Linux does), which makes the
/// reporting queue index 3 both with consecutive numbering and with QEMU's fixed queues.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_FREE_PAGE_HINT` (not negotiated; it would shift the reporting queue).
const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// `VIRTIO_BALLOON_F_PAGE_REPORTING`.
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// Balloon page size.
const PAGE: u64 = 4096;
/// Config offsets: `num_pages` (le32) and `actual` (le32).
const CFG_NUM_PAGES: u64 = 0;
const CFG_ACTUAL: u64 = 4;
/// `virtio_balloon_stat` tags and entry size (le16 tag, le64 value, packed).
const STAT_FREE: u16 = 4;
const STAT_TOTAL: u16 = 5;
const STAT_AVAILABLE: u16 = 6;
const STAT_SIZE: usize = 10;
/// Size of one reported free range.
const REPORT_CHUNK: u64 = 4 << 20;
/// Most ranges per reporting chain.
const REPORT_SEGS: usize = 8;
/// PFNs per inflate/deflate buffer (one page of le32).
const PFNS_PER_BUF: u32 = 1024;
/// Most MiB region B (the inflatable pages) spans.
pub const MAX_INFLATE_MIB: u64 = 64;
/// RAM left alone at the top of low memory.
const TOP_MARGIN: u64 = 1 << 20;

/// An initialised balloon.
pub struct Balloon {
    /// Transport.
    pub dev: VirtioPci,
    inflate: Queue,
    deflate: Queue,
    report: Option<Queue>,
    stats: Option<Queue>,
    /// One page of PFNs.
    pfns: u64,
    /// The statistics buffer.
    stats_buf: u64,
}

impl Balloon {
    /// Finds and initialises the first balloon (VERSION_1, and STATS_VQ and PAGE_REPORTING if
    /// offered).
    pub fn open() -> Result<Option<Balloon>, &'static str> {
        let Some(f) = super::pci::find(TYPE, 0) else {
            return Ok(None);
        };
        let mut dev = VirtioPci::new(&f)?;
        let feats = dev.begin_init(F_PAGE_REPORTING | F_STATS_VQ)?;
        let inflate = dev.setup_queue(0, 64)?;
        let deflate = dev.setup_queue(1, 64)?;
        let stats = if feats & F_STATS_VQ != 0 {
            Some(dev.setup_queue(2, 4)?)
        } else {
            None
        };
        let report = if feats & F_PAGE_REPORTING != 0 {
            // Queues of features not negotiated do not exist; the rest are consecutive.
            let idx =
                2 + u16::from(feats & F_STATS_VQ != 0) + u16::from(feats & F_FREE_PAGE_HINT != 0);
            Some(dev.setup_queue(idx, 32)?)
        } else {
            None
        };
        dev.driver_ok();
        if dev.needs_reset() {
            return Err("needs-reset");
        }
        Ok(Some(Balloon {
            dev,
            inflate,
            deflate,
            report,
            stats,
            pfns: mem::alloc(PAGE, PAGE),
            stats_buf: mem::alloc(PAGE, PAGE),
        }))
    }

    /// Sends statistics (`total_memory`, `free_memory`, `available_memory`, in bytes).
    pub fn send_stats(&mut self, total: u64, free: u64) -> Result<(), &'static str> {
        let Some(q) = self.stats.as_mut() else {
            return Ok(());
        };
        let entries = [
            (STAT_TOTAL, total),
            (STAT_FREE, free),
            (STAT_AVAILABLE, free),
        ];
        let buf = mem::bytes(self.stats_buf, STAT_SIZE * entries.len());
        for (e, (tag, val)) in buf.chunks_exact_mut(STAT_SIZE).zip(entries) {
            let (t, v) = e.split_at_mut(2);
            t.copy_from_slice(&tag.to_le_bytes());
            v.copy_from_slice(&val.to_le_bytes());
        }
        q.push(&[Buf {
            addr: self.stats_buf,
            len: u32::try_from(buf.len()).unwrap_or(u32::MAX),
            write: false,
        }])
        .ok_or("stats-queue-full")?;
        q.kick();
        probe!("balloon stats sent total={total} free={free}");
        Ok(())
    }

    /// Answers a statistics request: the device returned the buffer, send fresh numbers.
    pub fn service_stats(&mut self, total: u64, free: u64) -> Result<(), &'static str> {
        let Some(q) = self.stats.as_mut() else {
            return Ok(());
        };
        if q.pop_used().is_none() {
            return Ok(());
        }
        while q.pop_used().is_some() {}
        self.send_stats(total, free)
    }

    /// The host's target in pages.
    pub fn target(&self) -> u32 {
        self.dev.config::<u32>(CFG_NUM_PAGES)
    }

    /// Tells the host how many pages the balloon holds.
    pub fn set_actual(&self, pages: u32) {
        self.dev.config_write::<u32>(CFG_ACTUAL, pages);
    }

    /// Reports `[addr, addr+len)` as free, in chains of up to [`REPORT_SEGS`] ranges of
    /// [`REPORT_CHUNK`] bytes; returns the bytes the device gave back.
    pub fn report_free(&mut self, addr: u64, len: u64) -> Result<u64, &'static str> {
        let q = self.report.as_mut().ok_or("no-reporting")?;
        let end = addr + len;
        let mut at = addr;
        let mut done = 0;
        while at < end {
            let mut bufs = [Buf {
                addr: 0,
                len: 0,
                write: true,
            }; REPORT_SEGS];
            let mut n = 0;
            let mut bytes = 0;
            while n < REPORT_SEGS && at < end {
                let l = (end - at).min(REPORT_CHUNK);
                bufs[n] = Buf {
                    addr: at,
                    len: l as u32,
                    write: true,
                };
                n += 1;
                at += l;
                bytes += l;
            }
            q.push(&bufs[..n]).ok_or("queue-full")?;
            q.kick();
            if q.wait_used(5000) == Wait::Timeout {
                return Err("report-timeout");
            }
            q.pop_used().ok_or("no-used")?;
            done += bytes;
        }
        Ok(done)
    }

    /// Sends the pages `first_pfn..first_pfn+count` on the inflate or deflate queue.
    fn send_pfns(&mut self, deflate: bool, first_pfn: u32, count: u32) -> Result<(), &'static str> {
        let q = if deflate {
            &mut self.deflate
        } else {
            &mut self.inflate
        };
        let mut sent = 0u32;
        while sent < count {
            let n = (count - sent).min(PFNS_PER_BUF);
            for i in 0..n {
                let at = self.pfns + 4 * u64::from(i);
                crate::port::mmio::write::<u32>(at, first_pfn + sent + i);
            }
            q.push(&[Buf {
                addr: self.pfns,
                len: 4 * n,
                write: false,
            }])
            .ok_or("queue-full")?;
            q.kick();
            if q.wait_used(5000) == Wait::Timeout {
                return Err("pfn-timeout");
            }
            q.pop_used().ok_or("no-used")?;
            sent += n;
        }
        Ok(())
    }

    /// Moves the balloon from `held` pages to `target` pages (capped at `max`), taking pages
    /// from `base_pfn` upwards and giving back the highest first; returns the new size.
    pub fn resize(
        &mut self,
        base_pfn: u32,
        held: u32,
        target: u32,
        max: u32,
    ) -> Result<u32, &'static str> {
        let target = target.min(max);
        if target > held {
            self.send_pfns(false, base_pfn + held, target - held)?;
        } else if target < held {
            self.send_pfns(true, base_pfn + target, held - target)?;
        }
        self.set_actual(target);
        Ok(target)
    }
}

/// Sleeps `ms` milliseconds, halting between timer interrupts.
fn sleep_ms(ms: u64) {
    let dl = time::deadline_ms(ms);
    while !time::expired(dl) {
        crate::interrupts::wait();
    }
}

/// Writes one byte in every page of `[addr, addr+len)` so the host backs it.
fn touch(addr: u64, len: u64) {
    let mut p = addr;
    while p < addr + len {
        crate::port::mmio::write::<u64>(p, p ^ 0x5a5a_5a5a);
        p += PAGE;
    }
}

/// The `balloon` selftest part.
pub fn selftest() {
    let mut b = match Balloon::open() {
        Ok(Some(b)) => b,
        Ok(None) => return probe!("balloon skip no-device"),
        Err(e) => return fail("balloon", format_args!("init {e}")),
    };
    if let Err(e) = run(&mut b) {
        fail("balloon", format_args!("{e}"));
    }
}

fn run(b: &mut Balloon) -> Result<(), &'static str> {
    let boot = pvh::info();
    let mb = boot.arg_u64("pv.balloon.mb", 16);
    let wait = boot.arg_u64("pv.balloon.wait", 500);
    let follow = boot.arg_u64("pv.balloon.follow", 0) != 0;
    let follow_ms = boot.arg_u64("pv.balloon.follow_ms", 5000);
    let top = match boot.low_ram {
        0 => mem::ARENA_END + (64 << 20),
        n => n.min(0xC000_0000),
    }
    .saturating_sub(TOP_MARGIN);
    let a_start = mem::ARENA_END;
    let a_len = mb.saturating_mul(1 << 20).min(top.saturating_sub(a_start)) & !(PAGE - 1);
    // Statistics: all RAM, and what the balloon part does not hold (everything above the arena).
    let total = top + TOP_MARGIN;
    let free = |held: u32| {
        top.saturating_sub(a_start)
            .saturating_sub(u64::from(held) * PAGE)
    };
    b.send_stats(total, free(0))?;

    // (1) Free page reporting.
    if b.report.is_some() && a_len > 0 {
        touch(a_start, a_len);
        probe!("balloon touched mb={}", a_len >> 20);
        sleep_ms(wait);
        let done = b.report_free(a_start, a_len)?;
        probe!("balloon reported mb={}", done >> 20);
        sleep_ms(wait);
    } else {
        probe!("balloon reporting skip");
    }

    // (2) Inflate region B to the host's target.
    let b_start = a_start + a_len;
    let b_len = top.saturating_sub(b_start).min(MAX_INFLATE_MIB << 20) & !(PAGE - 1);
    // Region B is below 3 GiB, so its PFNs fit in 32 bits.
    let base_pfn = crate::bits::lo32(b_start / PAGE);
    let max = (b_len / PAGE) as u32;
    let mut held = 0u32;
    if follow {
        touch(b_start, b_len);
        probe!("balloon following max_pages={max}");
        let dl = time::deadline_ms(follow_ms);
        let mut peak = 0u32;
        while !time::expired(dl) {
            b.service_stats(total, free(held))?;
            let target = b.target().min(max);
            if target != held {
                let grew = target > held;
                held = b.resize(base_pfn, held, target, max)?;
                peak = peak.max(held);
                if grew {
                    probe!("balloon inflated pages={held}");
                } else {
                    probe!("balloon deflated pages={held}");
                }
            } else if peak > 0 && held == 0 {
                break; // inflated and given back: done
            }
            sleep_ms(10);
        }
        // Let the host look at the final state before the probe moves on (or powers off).
        sleep_ms(wait);
    } else {
        let target = b.target().min(max);
        touch(b_start, u64::from(target) * PAGE);
        held = b.resize(base_pfn, 0, target, max)?;
        probe!("balloon inflated pages={held}");
    }
    probe!(
        "balloon ok report_irq={} inflate_irq={}",
        b.report.as_ref().map_or("none", |q| q.irq_mode()),
        b.inflate.irq_mode()
    );
    Ok(())
}
