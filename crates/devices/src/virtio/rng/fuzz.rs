//! The rng worker for `devices::fuzzing`, built as activation builds it.

use super::*;

/// A worker over the request queue.
pub(crate) fn worker(
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queue: VirtQueue,
) -> Box<dyn DeviceWorker> {
    Box::new(RngWorker {
        mem,
        interrupt,
        queue,
        buf: Vec::new(),
    })
}
