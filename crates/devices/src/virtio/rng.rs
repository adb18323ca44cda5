//! virtio-rng: fills each device-writable buffer with bytes from the host's `getrandom`.
//!
//! The smallest device, and the model for a new one: a [`VirtioBase`] with the device's type,
//! queues and features, and a worker built in [`VirtioDevice::start`].

use std::sync::Arc;

use vmm_sys_util::epoll::Epoll;

use super::worker::{DeviceWorker, Popped, VirtQueue, COMMON_FEATURES};
use super::Interrupt;
use super::{device_type, ActivateError, Activation, DeviceCounters, VirtioBase, VirtioDevice};
use crate::GuestMem;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes returned for one request.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// A virtio entropy device.
pub struct Rng {
    base: VirtioBase,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Rng {
        Rng {
            base: VirtioBase::new(device_type::RNG, &[QUEUE_SIZE], COMMON_FEATURES),
        }
    }
}

impl Default for Rng {
    fn default() -> Self {
        Rng::new()
    }
}

impl VirtioDevice for Rng {
    fn base(&self) -> &VirtioBase {
        &self.base
    }

    fn base_mut(&mut self) -> &mut VirtioBase {
        &mut self.base
    }

    fn start(&mut self, act: Activation) -> Result<Box<dyn DeviceWorker>, ActivateError> {
        let queue = act
            .queues
            .into_iter()
            .next()
            .ok_or(ActivateError::BadQueue(0))?;
        Ok(Box::new(RngWorker {
            mem: act.mem,
            interrupt: act.interrupt,
            counters: act.counters,
            queue,
            buf: Vec::new(),
        }))
    }
}

struct RngWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    counters: Arc<DeviceCounters>,
    queue: VirtQueue,
    buf: Vec<u8>,
}

impl DeviceWorker for RngWorker {
    fn queue_kicked(&mut self, _epoll: &Epoll, _queue: usize) {
        self.process_queue();
    }
}

impl RngWorker {
    fn process_queue(&mut self) {
        let RngWorker {
            mem,
            interrupt,
            counters,
            queue,
            buf,
        } = self;
        queue.serve(mem, &**interrupt, |popped| match popped {
            Popped::Chain(chain) => {
                let n = chain.writable_len().min(MAX_REQUEST_BYTES);
                buf.resize(n, 0);
                let ok = fill_random(buf).is_ok() && chain.write_at(mem, 0, buf).is_ok();
                // n <= MAX_REQUEST_BYTES, which fits in u32.
                let used = if ok { u32::try_from(n).unwrap_or(0) } else { 0 };
                if ok {
                    counters.request(u64::from(used));
                } else {
                    counters.error();
                }
                (chain.head, used)
            }
            Popped::Malformed { head, error } => {
                crate::guest_warn!("virtio-rng: malformed request: {error}");
                counters.error();
                (head, 0)
            }
        });
    }
}

/// Fills `buf` from the kernel's random pool.
pub(crate) fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while let Some(rest) = buf.get_mut(done..).filter(|r| !r.is_empty()) {
        // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes owned by us.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // n >= 0 here and at most rest.len().
        done += n.unsigned_abs();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::chain::DESC_F_WRITE;
    use crate::virtio::worker::testing::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn fills_buffers_with_random_bytes() {
        let mem = test_mem();
        let tq = TestQueue::new(0x1000, 16);
        let irq = FakeInterrupt::new();
        let mut rng = Rng::new();
        rng.ack_features(rng.device_features());
        let (queues, kicks) = active_queues(&[tq]);
        rng.activate(mem.clone(), irq.clone(), queues).unwrap();

        tq.add_chain(
            &mem,
            0,
            &[(0x10000, 100, DESC_F_WRITE), (0x20000, 28, DESC_F_WRITE)],
        );
        // A chain asking for more than the cap gets exactly the cap.
        tq.add_chain(&mem, 2, &[(0x30000, 0x20000, DESC_F_WRITE)]);
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| tq.used_idx(&mem) == 2));
        assert_eq!(tq.used_elem(&mem, 0), (0, 128));
        assert_eq!(tq.used_elem(&mem, 1), (2, 64 << 10));
        let mut a = [0u8; 100];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert!(a.iter().any(|&b| b != a[0]), "bytes are not constant");
        let mut tail = [0u8; 16];
        mem.read_slice(&mut tail, GuestAddress(0x30000 + MAX_REQUEST_BYTES as u64))
            .unwrap();
        assert_eq!(tail, [0u8; 16], "nothing written past the cap");
        assert!(wait_until(|| irq.signals_for(0) >= 1));
        let c = rng.counters();
        assert_eq!((c.requests, c.errors), (2, 0));
        assert_eq!(c.bytes, 128 + MAX_REQUEST_BYTES as u64);
        assert_eq!(c.interrupts, irq.signals_for(0) as u64);

        // Reset stops the worker; the device can be activated again.
        rng.reset();
        rng.ack_features(rng.device_features());
        let tq2 = TestQueue::new(0x8000, 16);
        let (queues, kicks) = active_queues(&[tq2]);
        rng.activate(mem.clone(), irq.clone(), queues).unwrap();
        tq2.add_chain(&mem, 0, &[(0x10000, 8, DESC_F_WRITE)]);
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| tq2.used_idx(&mem) == 1));
        rng.reset();
        assert_eq!(irq.errors(), 0);
    }

    #[test]
    fn paused_worker_leaves_the_queue_alone_until_resumed() {
        let mem = test_mem();
        let tq = TestQueue::new(0x1000, 16);
        let irq = FakeInterrupt::new();
        let mut rng = Rng::new();
        rng.ack_features(rng.device_features());
        let (queues, kicks) = active_queues(&[tq]);
        rng.activate(mem.clone(), irq.clone(), queues).unwrap();
        rng.pause();
        rng.pause(); // Idempotent.
        tq.add_chain(&mem, 0, &[(0x10000, 16, DESC_F_WRITE)]);
        kicks[0].write(1).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(tq.used_idx(&mem), 0, "a paused worker completed a chain");
        rng.resume();
        assert!(wait_until(|| tq.used_idx(&mem) == 1));
        // Reset while paused does not hang.
        rng.pause();
        rng.reset();
    }

    #[test]
    fn malformed_chain_is_completed_empty() {
        let mem = test_mem();
        let tq = TestQueue::new(0x1000, 16);
        let irq = FakeInterrupt::new();
        let mut rng = Rng::new();
        let (queues, kicks) = active_queues(&[tq]);
        rng.activate(mem.clone(), irq.clone(), queues).unwrap();
        tq.add_chain(&mem, 0, &[(0xF_FF00, 0x200, DESC_F_WRITE)]);
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| tq.used_idx(&mem) == 1));
        assert_eq!(tq.used_elem(&mem, 0), (0, 0));
        assert_eq!(rng.counters().errors, 1);
        assert_eq!(rng.counters().requests, 0);
        // An avail index jumping past the queue size breaks the queue.
        tq.set_avail_idx(&mem, 100);
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| irq.errors() == 1));
        rng.reset();
    }
}
