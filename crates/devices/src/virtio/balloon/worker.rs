//! The balloon's worker thread: serves the inflate, deflate, stats and reporting queues, and
//! drops validated guest RAM ranges from the host.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::{Epoll, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{parse_stats, QueueRole, Shared, MAX_PFNS_PER_CHAIN, MAX_STATS, PAGE_SIZE};
use super::{PFN_CHUNK, REFRESH_TOKEN, STAT_SIZE};
use crate::bus::lock;
use crate::virtio::chain::Chain;
use crate::virtio::worker::{add_fd, DeviceWorker, Popped, VirtQueue};
use crate::virtio::{DeviceCounters, Interrupt};
use crate::GuestMem;

/// Validates that `[gpa, gpa + len)` is inside one guest RAM region and returns the host
/// address of `gpa`, page-aligned on the host; `None` otherwise.
fn host_range(mem: &GuestMem, gpa: u64, len: u64) -> Option<usize> {
    if len == 0 {
        return None;
    }
    let addr = GuestAddress(gpa);
    let region = mem.find_region(addr)?;
    let off = region.to_region_addr(addr)?;
    let end = off.raw_value().checked_add(len)?;
    if end > region.len() {
        return None;
    }
    let host = region.get_host_address(off).ok()? as usize;
    (host as u64).is_multiple_of(PAGE_SIZE).then_some(host)
}

/// Drops `len` bytes of guest RAM at host address `host` (from [`host_range`]) from the host.
fn discard(host: usize, len: usize) -> io::Result<()> {
    // SAFETY: `[host, host + len)` was validated by `host_range` to lie inside one page-aligned
    // guest RAM mapping that `GuestMem` keeps mapped while the worker holds it. MADV_DONTNEED
    // never unmaps: it only drops the pages' contents (private memory reads back as zeros, or
    // as the file's contents for a private file mapping), and guest memory is only accessed
    // through volatile accessors, so no Rust reference is invalidated.
    let r = unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTNEED) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`PAGE_SIZE`] as a host length.
const PAGE_BYTES: usize = 4096;
const _: () = assert!(PAGE_BYTES as u64 == PAGE_SIZE);

/// A contiguous host range being accumulated before one `madvise`.
#[derive(Default)]
struct Run {
    host: usize,
    len: usize,
}

impl Run {
    /// Adds a page at `host`, flushing the run first if it is not contiguous.
    fn add(&mut self, host: usize) {
        if self.len > 0 && self.host.checked_add(self.len) == Some(host) {
            self.len += PAGE_BYTES;
            return;
        }
        self.flush();
        self.host = host;
        self.len = PAGE_BYTES;
    }

    fn flush(&mut self) {
        if self.len > 0 {
            if let Err(e) = discard(self.host, self.len) {
                crate::guest_warn!("virtio-balloon: madvise of {} bytes failed: {e}", self.len);
            }
        }
        self.len = 0;
    }
}

pub(super) struct BalloonWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    /// Queues in activation order (the position is the kick token).
    queues: Vec<(QueueRole, VirtQueue)>,
    shared: Arc<Shared>,
    refresh: EventFd,
    /// The stats buffer the device keeps: (queue position, head).
    held_stats: Option<(usize, u16)>,
}

impl BalloonWorker {
    /// A worker for `queues` (in activation order, with their roles).
    pub(super) fn new(
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        counters: Arc<DeviceCounters>,
        queues: Vec<(QueueRole, VirtQueue)>,
        shared: Arc<Shared>,
        refresh: EventFd,
    ) -> Self {
        BalloonWorker {
            mem,
            interrupt,
            counters,
            queues,
            shared,
            refresh,
            held_stats: None,
        }
    }
}

impl DeviceWorker for BalloonWorker {
    fn register(&mut self, epoll: &Epoll) -> io::Result<()> {
        add_fd(epoll, self.refresh.as_raw_fd(), REFRESH_TOKEN, EventSet::IN)
    }

    fn queue_kicked(&mut self, _epoll: &Epoll, queue: usize) {
        let Some(&(role, _)) = self.queues.get(queue) else {
            return;
        };
        match role {
            QueueRole::Stats => self.process_stats(queue),
            _ => self.process_queue(queue, role),
        }
    }

    fn backend_event(&mut self, _epoll: &Epoll, token: u64, _events: EventSet) {
        if token != REFRESH_TOKEN {
            return;
        }
        // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
        let _ = self.refresh.read();
        // Returning the kept buffer asks the driver for new statistics.
        if let Some((pos, head)) = self.held_stats.take() {
            self.shared
                .stats_buffer_held
                .store(false, Ordering::Release);
            if let Some((_, vq)) = self.queues.get_mut(pos) {
                vq.complete(&self.mem, &*self.interrupt, head, 0);
                vq.notify(&self.mem, &*self.interrupt);
            }
        }
    }
}

impl BalloonWorker {
    /// Serves the inflate, deflate or reporting queue at `pos`.
    fn process_queue(&mut self, pos: usize, role: QueueRole) {
        let Some((_, vq)) = self.queues.get_mut(pos) else {
            return;
        };
        let (mem, irq, shared) = (&self.mem, &*self.interrupt, &*self.shared);
        let counters = &*self.counters;
        vq.serve(mem, irq, |popped| match popped {
            Popped::Chain(chain) => {
                let done = match role {
                    QueueRole::Inflate => inflate(mem, shared, &chain),
                    QueueRole::Deflate => deflate(shared, &chain),
                    _ => report_free(mem, shared, &chain),
                };
                counters.request(done.bytes);
                counters.errors(done.rejected);
                (chain.head, 0)
            }
            Popped::Malformed { head, error } => {
                crate::guest_warn!("virtio-balloon: malformed {role:?} buffer: {error}");
                shared.rejected.fetch_add(1, Ordering::Relaxed);
                counters.error();
                (head, 0)
            }
        });
    }

    /// Takes the driver's statistics buffer, records its contents and keeps it.
    fn process_stats(&mut self, pos: usize) {
        let Some((_, vq)) = self.queues.get_mut(pos) else {
            return;
        };
        let (mem, irq, shared) = (&self.mem, &*self.interrupt, &*self.shared);
        while let Some(popped) = vq.pop(mem, irq) {
            match popped {
                Popped::Chain(chain) => {
                    let len = chain.readable_len().min(MAX_STATS * STAT_SIZE);
                    self.counters.request(len as u64);
                    let mut raw = vec![0u8; len];
                    if chain.read_at(mem, 0, &mut raw).is_ok() {
                        let mut stats = lock(&shared.stats);
                        *stats = parse_stats(&raw);
                        shared.stats_updates.fetch_add(1, Ordering::AcqRel);
                        shared.stats_changed.notify_all();
                    }
                    shared.stats_buffer_held.store(true, Ordering::Release);
                    // The driver keeps one buffer in flight; give back an older one if any.
                    if let Some((_, old)) = self.held_stats.replace((pos, chain.head)) {
                        if !vq.complete(mem, irq, old, 0) {
                            break;
                        }
                    }
                }
                Popped::Malformed { head, error } => {
                    crate::guest_warn!("virtio-balloon: malformed stats buffer: {error}");
                    self.counters.error();
                    if !vq.complete(mem, irq, head, 0) {
                        break;
                    }
                }
            }
        }
        vq.notify(mem, irq);
    }
}

/// What one inflate, deflate or reporting buffer did.
struct Done {
    /// Bytes of guest memory given back to the host or taken back by the guest.
    bytes: u64,
    /// Pages or ranges refused (not guest RAM).
    rejected: u64,
}

/// Drops every page listed in an inflate buffer that lies in guest RAM.
fn inflate(mem: &GuestMem, shared: &Shared, chain: &Chain) -> Done {
    let total = chain.readable_len() / 4;
    if !chain.readable_len().is_multiple_of(4) || total > MAX_PFNS_PER_CHAIN {
        crate::guest_warn!(
            "virtio-balloon: inflate buffer of {} bytes (whole PFNs up to {MAX_PFNS_PER_CHAIN} used)",
            chain.readable_len()
        );
    }
    let total = total.min(MAX_PFNS_PER_CHAIN);
    let mut raw = [0u8; PFN_CHUNK * 4];
    let mut run = Run::default();
    let (mut dropped, mut rejected) = (0u64, 0u64);
    let mut done = 0;
    while done < total {
        let n = (total - done).min(PFN_CHUNK);
        let Some(buf) = raw.get_mut(..n * 4) else {
            break;
        };
        if chain.read_at(mem, done * 4, buf).is_err() {
            break;
        }
        for pfn in buf.chunks_exact(4) {
            let pfn = u32::from_le_bytes([pfn[0], pfn[1], pfn[2], pfn[3]]);
            let gpa = u64::from(pfn) << 12;
            match host_range(mem, gpa, PAGE_SIZE) {
                Some(host) => {
                    run.add(host);
                    dropped += 1;
                }
                None => {
                    crate::guest_warn!("virtio-balloon: inflated PFN {pfn:#x} is not guest RAM");
                    rejected += 1;
                }
            }
        }
        done += n;
    }
    run.flush();
    shared.inflated_pages.fetch_add(dropped, Ordering::Relaxed);
    shared.rejected.fetch_add(rejected, Ordering::Relaxed);
    Done {
        bytes: dropped * PAGE_SIZE,
        rejected,
    }
}

/// Counts the pages of a deflate buffer (they return to the guest on touch).
fn deflate(shared: &Shared, chain: &Chain) -> Done {
    let n = (chain.readable_len() / 4).min(MAX_PFNS_PER_CHAIN) as u64;
    shared.deflated_pages.fetch_add(n, Ordering::Relaxed);
    Done {
        bytes: n * PAGE_SIZE,
        rejected: 0,
    }
}

/// Drops each reported free range, rounded inward to whole pages, if it lies in one RAM region.
fn report_free(mem: &GuestMem, shared: &Shared, chain: &Chain) -> Done {
    let mut done = Done {
        bytes: 0,
        rejected: 0,
    };
    let segs = chain
        .readable_segments()
        .iter()
        .chain(chain.writable_segments());
    for seg in segs {
        let addr = seg.addr.raw_value();
        let range = addr
            .checked_add(PAGE_SIZE - 1)
            .map(|a| a & !(PAGE_SIZE - 1))
            .zip(addr.checked_add(u64::from(seg.len)))
            .map(|(start, end)| (start, end & !(PAGE_SIZE - 1)))
            .filter(|&(start, end)| end > start);
        let Some((start, end)) = range else {
            continue;
        };
        let len = end - start;
        let Some(host) = host_range(mem, start, len) else {
            crate::guest_warn!(
                "virtio-balloon: reported range {start:#x}+{len:#x} is not inside one RAM region"
            );
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            done.rejected += 1;
            continue;
        };
        // len <= the region's length, which is a usize.
        let Ok(host_len) = usize::try_from(len) else {
            continue;
        };
        match discard(host, host_len) {
            Ok(()) => {
                shared.reported_bytes.fetch_add(len, Ordering::Relaxed);
                done.bytes += len;
            }
            Err(e) => crate::guest_warn!("virtio-balloon: madvise of {len} bytes failed: {e}"),
        }
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ranges_stay_inside_one_region() {
        let mem = GuestMem::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
            (GuestAddress(0x40_0000), 0x1000),
        ])
        .unwrap();
        let base = |gpa: u64| mem.get_host_address(GuestAddress(gpa)).unwrap() as usize;
        assert_eq!(host_range(&mem, 0, 0x10_0000), Some(base(0)));
        assert_eq!(host_range(&mem, 0xf_f000, 0x1000), Some(base(0xf_f000)));
        assert_eq!(host_range(&mem, 0x40_0000, 0x1000), Some(base(0x40_0000)));
        // Across two adjacent regions, past the end, in a hole, empty, overflowing.
        assert_eq!(host_range(&mem, 0xf_f000, 0x2000), None);
        assert_eq!(host_range(&mem, 0x40_0000, 0x1001), None);
        assert_eq!(host_range(&mem, 0x30_0000, 0x1000), None);
        assert_eq!(host_range(&mem, 0, 0), None);
        assert_eq!(host_range(&mem, u64::MAX - 0xfff, 0x1000), None);
        assert_eq!(host_range(&mem, 0x1000, u64::MAX), None);
    }
}
