//! The block worker for `devices::fuzzing`, built as activation builds it.

use super::*;

/// A worker for `block` over its one queue.
pub(crate) fn worker(
    block: &Block,
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queue: VirtQueue,
) -> Box<dyn DeviceWorker> {
    Box::new(block.new_worker(mem, interrupt, queue))
}
