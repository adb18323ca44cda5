//! The net worker for `devices::fuzzing`, built as activation builds it.

use super::*;

/// A worker over the rx and tx queues (in that order) and `backend`.
pub(crate) fn worker(
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    rx: VirtQueue,
    tx: VirtQueue,
    backend: Arc<dyn NetBackend>,
) -> Box<dyn DeviceWorker> {
    Box::new(NetWorker {
        mem,
        interrupt,
        rx,
        tx,
        backend,
        frame: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
        pending: None,
        readable: true,
    })
}
