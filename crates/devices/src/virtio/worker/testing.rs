//! Test helpers: guest memory, hand-built split virtqueues and a counting interrupt.
// Test data: hand-built guest-side values and small constants, narrowed on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::virtio::{ActiveQueue, Interrupt};
use crate::GuestMem;

/// 1 MiB of guest memory at address 0.
pub fn test_mem() -> GuestMem {
    GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("guest memory")
}

/// Writes descriptor `index` of the table at `table`.
pub fn write_desc(
    mem: &GuestMem,
    table: GuestAddress,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let mut raw = [0u8; 16];
    raw[0..8].copy_from_slice(&addr.to_le_bytes());
    raw[8..12].copy_from_slice(&len.to_le_bytes());
    raw[12..14].copy_from_slice(&flags.to_le_bytes());
    raw[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&raw, GuestAddress(table.0 + u64::from(index) * 16))
        .expect("descriptor in memory");
}

/// A split virtqueue laid out by hand in guest memory, playing the driver.
#[derive(Clone, Copy, Debug)]
pub struct TestQueue {
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub size: u16,
}

impl TestQueue {
    /// A queue of `size` entries with its rings at `base` (16 KiB is enough for size 256).
    pub fn new(base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestQueue {
            desc: GuestAddress(desc),
            avail: GuestAddress(avail),
            used: GuestAddress(used),
            size,
        }
    }

    /// The device-side `Queue`, configured and ready.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        q.try_set_desc_table_address(self.desc).expect("desc");
        q.try_set_avail_ring_address(self.avail).expect("avail");
        q.try_set_used_ring_address(self.used).expect("used");
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, mem: &GuestMem, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        write_desc(mem, self.desc, index, addr, len, flags, next);
    }

    /// Writes `bufs` (addr, len, flags) as a chain in slots `first..` and makes it available.
    pub fn add_chain(&self, mem: &GuestMem, first: u16, bufs: &[(u64, u32, u16)]) {
        let n = bufs.len() as u16;
        for (i, &(addr, len, flags)) in bufs.iter().enumerate() {
            let i = i as u16;
            let slot = (first + i) % self.size;
            let (flags, next) = if i + 1 < n {
                (
                    flags | crate::virtio::chain::DESC_F_NEXT,
                    (slot + 1) % self.size,
                )
            } else {
                (flags, 0)
            };
            self.desc(mem, slot, addr, len, flags, next);
        }
        self.publish(mem, first);
    }

    /// Puts `head` in the avail ring and bumps the avail index.
    pub fn publish(&self, mem: &GuestMem, head: u16) {
        let idx = self.avail_idx(mem);
        let slot = self.avail.0 + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
        self.set_avail_idx(mem, idx.wrapping_add(1));
    }

    pub fn avail_idx(&self, mem: &GuestMem) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.avail.0 + 2)).unwrap())
    }

    pub fn set_avail_idx(&self, mem: &GuestMem, idx: u16) {
        mem.write_obj(idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
    }

    /// The used ring's index.
    pub fn used_idx(&self, mem: &GuestMem) -> u16 {
        u16::from_le(mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap())
    }

    /// Used ring element `n`: (head, len).
    pub fn used_elem(&self, mem: &GuestMem, n: u16) -> (u32, u32) {
        let at = self.used.0 + 4 + 8 * u64::from(n % self.size);
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }
}

/// An [`Interrupt`] that counts what it is asked to do.
#[derive(Default)]
pub struct FakeInterrupt {
    pub signals: Mutex<Vec<u16>>,
    pub errors: AtomicUsize,
}

impl FakeInterrupt {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn signals_for(&self, queue: u16) -> usize {
        self.signals
            .lock()
            .unwrap()
            .iter()
            .filter(|&&q| q == queue)
            .count()
    }

    pub fn errors(&self) -> usize {
        self.errors.load(Ordering::SeqCst)
    }
}

impl Interrupt for FakeInterrupt {
    fn signal_queue(&self, queue: u16) {
        self.signals.lock().unwrap().push(queue);
    }
    fn signal_config(&self) {}
    fn device_error(&self) {
        self.errors.fetch_add(1, Ordering::SeqCst);
    }
}

/// Builds the `ActiveQueue`s for `queues`, returning them and a clone of each kick eventfd.
pub fn active_queues(queues: &[TestQueue]) -> (Vec<ActiveQueue>, Vec<EventFd>) {
    let mut active = Vec::new();
    let mut kicks = Vec::new();
    for (i, tq) in queues.iter().enumerate() {
        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        kicks.push(kick.try_clone().unwrap());
        active.push(ActiveQueue {
            index: i as u16,
            queue: tq.queue(),
            kick,
        });
    }
    (active, kicks)
}

/// Polls `cond` until it holds or 5 s pass; returns whether it held.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    cond()
}

/// A tiny xorshift PRNG for fuzz loops.
pub struct XorShift(pub u64);

impl XorShift {
    /// The next value.
    // Not an iterator: it never ends; `next` reads naturally in the tests' loops.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}
