//! virtio-rng: fills each device-writable buffer with bytes from the host's `getrandom`.

use std::sync::Arc;

use vmm_sys_util::epoll::Epoll;

use super::worker::{
    prepare_queues, spawn_worker, DeviceWorker, Popped, VirtQueue, WorkerSlot, COMMON_FEATURES,
};
use super::{device_type, ActivateError, ActiveQueue, Interrupt, VirtioDevice};
use crate::GuestMem;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes returned for one request.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// A virtio entropy device.
#[derive(Default)]
pub struct Rng {
    acked: u64,
    worker: WorkerSlot,
}

impl Rng {
    /// A new, inactive device.
    pub fn new() -> Rng {
        Rng::default()
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn device_features(&self) -> u64 {
        COMMON_FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.device_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMem,
        interrupt: Arc<dyn Interrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        self.worker.stop();
        let (mut vqs, kicks) = prepare_queues(&mem, queues, self.acked, 1)?;
        let queue = vqs.pop().ok_or(ActivateError::BadQueue(0))?;
        let worker = RngWorker {
            mem,
            interrupt,
            queue,
            buf: Vec::new(),
        };
        self.worker.set(spawn_worker("virtio-rng", kicks, worker)?);
        Ok(())
    }

    fn pause(&mut self) {
        self.worker.pause();
    }

    fn resume(&mut self) {
        self.worker.resume();
    }

    fn reset(&mut self) {
        self.worker.stop();
        self.acked = 0;
    }
}

struct RngWorker {
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
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
        let interrupt = self.interrupt.clone();
        while let Some(popped) = self.queue.pop(&self.mem, &*interrupt) {
            let (head, used) = match popped {
                Popped::Chain(chain) => {
                    let n = chain.writable_len().min(MAX_REQUEST_BYTES);
                    self.buf.resize(n, 0);
                    let ok = fill_random(&mut self.buf).is_ok()
                        && chain.write_at(&self.mem, 0, &self.buf).is_ok();
                    // n <= MAX_REQUEST_BYTES fits in u32.
                    (chain.head, if ok { n as u32 } else { 0 })
                }
                Popped::Malformed { head, error } => {
                    crate::guest_warn!("virtio-rng: malformed request: {error}");
                    (head, 0)
                }
            };
            if !self.queue.complete(&self.mem, &*interrupt, head, used) {
                break;
            }
        }
        self.queue.notify(&self.mem, &*interrupt);
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
        done += n as usize;
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
        assert_eq!(tq.used_elem(&mem, 1), (2, MAX_REQUEST_BYTES as u32));
        let mut a = [0u8; 100];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert!(a.iter().any(|&b| b != a[0]), "bytes are not constant");
        let mut tail = [0u8; 16];
        mem.read_slice(&mut tail, GuestAddress(0x30000 + MAX_REQUEST_BYTES as u64))
            .unwrap();
        assert_eq!(tail, [0u8; 16], "nothing written past the cap");
        assert!(wait_until(|| irq.signals_for(0) >= 1));

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
        // An avail index jumping past the queue size breaks the queue.
        tq.set_avail_idx(&mem, 100);
        kicks[0].write(1).unwrap();
        assert!(wait_until(|| irq.errors() == 1));
        rng.reset();
    }
}
