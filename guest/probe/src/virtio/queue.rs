//! Split virtqueues (virtio 1.1 section 2.6) in probe-owned memory, with waits that use
//! the queue's MSI-X vector (`sti; hlt`) and fall back to polling.

use crate::interrupts::{self, irq_count};
use crate::port::mmio;
use crate::{mem, time};
use core::cell::Cell;
use core::sync::atomic::{fence, Ordering};

/// Descriptor flag: chain continues in `next`.
pub const DESC_NEXT: u16 = 1;
/// Descriptor flag: device writes this buffer.
pub const DESC_WRITE: u16 = 2;
/// Descriptor flag: buffer is an indirect descriptor table.
pub const DESC_INDIRECT: u16 = 4;

/// One buffer of a chain.
#[derive(Clone, Copy)]
pub struct Buf {
    /// Physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable.
    pub write: bool,
}

/// How a wait ended.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Wait {
    /// The queue's MSI-X interrupt fired and a used entry was there.
    Irq,
    /// A used entry appeared but no interrupt came; found by polling.
    Polled,
    /// Nothing within the timeout.
    Timeout,
}

/// A split virtqueue.
pub struct Queue {
    /// Queue index on its device.
    pub index: u16,
    /// Number of descriptors (power of two, <= 256).
    pub size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    notify: u64,
    free_head: u16,
    num_free: u16,
    avail_idx: u16,
    last_used: u16,
    /// CPU vector of this queue's MSI-X interrupt.
    pub vector: Option<u8>,
    irq_seen: u32,
    /// Completions noticed through the interrupt.
    pub irq_hits: u32,
    /// Completions found by polling after the interrupt did not come.
    pub polled: u32,
    /// VIRTIO_RING_F_EVENT_IDX negotiated: kicks and interrupts follow the event indices.
    event_idx: bool,
    /// Avail idx at the last notification (EVENT_IDX kick suppression).
    kicked: Cell<u16>,
    /// Notifications actually sent by [`Queue::kick`].
    pub kicks: u32,
}

impl Queue {
    /// Allocates the rings for a queue of `size` entries.
    pub fn new(index: u16, size: u16, notify: u64, vector: Option<u8>) -> Self {
        let n = size as u64;
        let desc = mem::alloc(16 * n, 4096);
        let avail = mem::alloc(6 + 2 * n, 4096);
        let used = mem::alloc(6 + 8 * n, 4096);
        for i in 0..size {
            mmio::write::<u16>(desc + 16 * i as u64 + 14, (i + 1) % size);
        }
        Queue {
            index,
            size,
            desc,
            avail,
            used,
            notify,
            free_head: 0,
            num_free: size,
            avail_idx: 0,
            last_used: 0,
            vector,
            irq_seen: vector.map(irq_count).unwrap_or(0),
            irq_hits: 0,
            polled: 0,
            event_idx: false,
            kicked: Cell::new(0),
            kicks: 0,
        }
    }

    /// Turns on VIRTIO_RING_F_EVENT_IDX handling (only when the feature was negotiated): from
    /// now on [`Queue::kick`] notifies only when the device asked for it (`avail_event`), and
    /// [`Queue::pop_used`] asks for an interrupt at the next completion (`used_event`).
    pub fn enable_event_idx(&mut self) {
        self.event_idx = true;
        self.kicked.set(self.avail_idx);
        self.set_used_event(self.last_used);
    }

    /// `used_event` (after the avail ring): the device interrupts once used idx passes it.
    fn set_used_event(&self, idx: u16) {
        mmio::write::<u16>(self.avail + 4 + 2 * self.size as u64, idx);
        fence(Ordering::SeqCst);
    }

    /// `avail_event` (after the used ring): the device wants a notification once avail idx
    /// passes it.
    fn avail_event(&self) -> u16 {
        mmio::read::<u16>(self.used + 4 + 8 * self.size as u64)
    }

    /// Changes where [`Queue::kick`] writes.
    pub fn set_notify(&mut self, notify: u64) {
        self.notify = notify;
    }

    /// Descriptor table address.
    pub fn desc_addr(&self) -> u64 {
        self.desc
    }
    /// Driver (avail) ring address.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }
    /// Device (used) ring address.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// Writes descriptor `i` raw (hostile tests and chain building).
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = self.desc + 16 * (i % self.size) as u64;
        mmio::write::<u64>(d, addr);
        mmio::write::<u32>(d + 8, len);
        mmio::write::<u16>(d + 12, flags);
        mmio::write::<u16>(d + 14, next);
    }

    fn desc_next(&self, i: u16) -> u16 {
        mmio::read::<u16>(self.desc + 16 * (i % self.size) as u64 + 14)
    }

    fn desc_flags(&self, i: u16) -> u16 {
        mmio::read::<u16>(self.desc + 16 * (i % self.size) as u64 + 12)
    }

    /// Builds a chain from `bufs` and makes it available (no kick). Returns the head.
    pub fn push(&mut self, bufs: &[Buf]) -> Option<u16> {
        if bufs.is_empty() || bufs.len() > self.num_free as usize {
            return None;
        }
        let head = self.free_head;
        let mut i = head;
        for (k, b) in bufs.iter().enumerate() {
            let next = self.desc_next(i);
            let last = k + 1 == bufs.len();
            let flags = if b.write { DESC_WRITE } else { 0 } | if last { 0 } else { DESC_NEXT };
            self.write_desc(i, b.addr, b.len, flags, next);
            if last {
                self.free_head = next;
            } else {
                i = next;
            }
        }
        // bufs.len() <= num_free (checked above), a u16.
        self.num_free -= u16::try_from(bufs.len()).unwrap_or(self.num_free);
        self.publish(head);
        Some(head)
    }

    /// Puts `head` in the avail ring and bumps avail idx.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail_idx % self.size;
        mmio::write::<u16>(self.avail + 4 + 2 * slot as u64, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mmio::write::<u16>(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// Writes the avail idx directly (hostile tests).
    pub fn set_avail_idx_raw(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        mmio::write::<u16>(self.avail + 2, idx);
        fence(Ordering::SeqCst);
    }

    /// Notifies the device about this queue (with EVENT_IDX: only if the entries made
    /// available since the last notification include the one the device asked to hear about).
    pub fn kick(&mut self) {
        fence(Ordering::SeqCst);
        if self.event_idx {
            let (new, old) = (self.avail_idx, self.kicked.replace(self.avail_idx));
            // vring_need_event: event is in the half-open window (old, new].
            if new.wrapping_sub(self.avail_event()).wrapping_sub(1) >= new.wrapping_sub(old) {
                return;
            }
        }
        self.kicks += 1;
        mmio::write::<u16>(self.notify, self.index);
    }

    /// Whether the device has returned something we have not consumed.
    pub fn has_used(&self) -> bool {
        fence(Ordering::SeqCst);
        mmio::read::<u16>(self.used + 2) != self.last_used
    }

    /// Takes the next used element `(head, len)` and frees its chain.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        if !self.has_used() {
            return None;
        }
        let slot = self.last_used % self.size;
        let e = self.used + 4 + 8 * slot as u64;
        let id = mmio::read::<u32>(e);
        let len = mmio::read::<u32>(e + 4);
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            self.set_used_event(self.last_used);
        }
        // An id beyond the ring (a buggy or hostile device) is passed on as u16::MAX, which
        // no caller holds.
        let id = u16::try_from(id).unwrap_or(u16::MAX);
        if id < self.size {
            self.free_chain(id);
        }
        Some((id, len))
    }

    fn free_chain(&mut self, head: u16) {
        let mut i = head;
        let mut n = 1;
        while self.desc_flags(i) & DESC_NEXT != 0 && n < self.size {
            i = self.desc_next(i) % self.size;
            n += 1;
        }
        self.write_desc(i, 0, 0, 0, self.free_head);
        self.free_head = head;
        self.num_free = (self.num_free + n).min(self.size);
    }

    /// Waits up to `timeout_ms` for a used entry: `sti; hlt` until the queue's interrupt
    /// fires; a used entry without an interrupt for 20 ms counts as [`Wait::Polled`].
    pub fn wait_used(&mut self, timeout_ms: u64) -> Wait {
        let dl = time::deadline_ms(timeout_ms);
        let mut seen_used_at: Option<u64> = None;
        loop {
            let used = self.has_used();
            if let Some(v) = self.vector {
                let c = irq_count(v);
                if c != self.irq_seen {
                    self.irq_seen = c;
                    if used || self.has_used() {
                        self.irq_hits += 1;
                        return Wait::Irq;
                    }
                }
            }
            if used {
                let t = *seen_used_at.get_or_insert_with(|| time::deadline_ms(20));
                if self.vector.is_none() || time::expired(t) {
                    self.polled += 1;
                    return Wait::Polled;
                }
            }
            if time::expired(dl) {
                return Wait::Timeout;
            }
            if self.vector.is_some() {
                interrupts::wait();
            } else {
                core::hint::spin_loop();
            }
        }
    }

    /// A short description of how completions were noticed, for `PROBE <dev> irq ...`.
    pub fn irq_mode(&self) -> &'static str {
        match (self.irq_hits, self.polled) {
            (_, 0) if self.irq_hits > 0 => "msix",
            (0, _) => "poll",
            _ => "mixed",
        }
    }
}
