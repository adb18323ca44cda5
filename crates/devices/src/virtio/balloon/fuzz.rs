//! The balloon worker for `devices::fuzzing`, built as activation builds it.

use super::*;
use crate::virtio::worker::{DeviceWorker, VirtQueue};

/// A worker for `balloon` over `queues` (with the roles `features` gives them).
pub(crate) fn worker(
    balloon: &Balloon,
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<(QueueRole, VirtQueue)>,
) -> io::Result<Box<dyn DeviceWorker>> {
    Ok(Box::new(BalloonWorker::new(
        mem,
        interrupt,
        queues,
        balloon.shared.clone(),
        balloon.shared.refresh.try_clone()?,
    )))
}
