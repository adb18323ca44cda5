//! The vsock muxer for `devices::fuzzing`, built as activation builds it (guest CID 3).

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;

use super::muxer::Muxer;
use crate::virtio::worker::{DeviceWorker, VirtQueue};
use crate::virtio::Interrupt;
use crate::GuestMem;

/// A muxer over the rx, tx and event queues (in that order); `reset` makes it owe the
/// driver a transport reset event.
pub(crate) fn worker(
    mem: GuestMem,
    interrupt: Arc<dyn Interrupt>,
    queues: Vec<VirtQueue>,
    uds_path: PathBuf,
    listener: Arc<UnixListener>,
    reset: bool,
) -> Option<Box<dyn DeviceWorker>> {
    let mut muxer = Muxer::new(mem, interrupt, queues, 3, uds_path, listener)?;
    if reset {
        muxer.owe_transport_reset();
    }
    Some(Box::new(muxer))
}
